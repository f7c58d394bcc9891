//! The console in a real browser: Debian's headless Chromium, driven by playwright-core
//! (`tests/browser/console.cjs`), logs in through the form and loads the overview, the dead
//! letters and one dead letter of a console holding real dead letters. The screenshots and the
//! DOM after load go to `target/console-browser/`; this test reads the DOM.
//!
//! Chromium (`apt-get install chromium`) and playwright-core (npm, into
//! `$AUDIO_WORKER_HOME/tools/node`) are installed by `scripts/test.sh` when missing.

use std::path::PathBuf;
use std::process::Command;

use crate::console::{TOKEN, dead_letter, start_console};
use crate::helpers::{job, spawn_app};

fn playwright_core() -> PathBuf {
    let home = std::env::var("AUDIO_WORKER_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/audio-worker"));
    home.join("tools/node/node_modules/playwright-core")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_logs_in_and_shows_the_dead_letters() {
    let core = playwright_core();
    assert!(
        core.join("package.json").exists() && std::path::Path::new("/usr/bin/chromium").exists(),
        "the browser test needs Debian's chromium and playwright-core in {}: run scripts/test.sh, which installs them",
        core.display()
    );
    let mut app = spawn_app().await;
    let mut marked = job("/temp/chapter-1.wav");
    marked["text"] = "<script>document.title='pwned'</script> Chapter one".into();
    marked["customer_id"] = "acme-books".into();
    let mut other = job("/temp/chapter-2.wav");
    other["customer_id"] = "acme-books".into();
    let not_a_job =
        serde_json::json!({"asset_id": "7c0e-not-a-uuid", "customer_id": "acme-books", "user_id": "u1"});
    dead_letter(&mut app, &[marked.clone(), other.clone(), not_a_job]).await;
    let console = start_console(&app, false).await;

    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/console-browser");
    let _ = std::fs::remove_dir_all(&out);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser/console.cjs");
    let base = console.base.clone();
    let (out_dir, core_dir) = (out.clone(), core.clone());
    let detail_asset = marked["asset_id"].as_str().unwrap().to_owned();
    let run = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(script)
            .env("PLAYWRIGHT_CORE", core_dir)
            .env("CONSOLE_URL", base)
            .env("CONSOLE_TOKEN", TOKEN)
            .env("OUT_DIR", out_dir)
            .env("DETAIL_ASSET", detail_asset)
            .output()
            .expect("node (Debian's nodejs)")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "the browser run failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let pages: Vec<serde_json::Value> = stdout.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let titles: Vec<&str> = pages.iter().map(|p| p["title"].as_str().unwrap_or_default()).collect();
    assert_eq!(
        titles,
        [
            "Log in: audio-worker console",
            "Overview: audio-worker console",
            "Dead letters: audio-worker console",
            titles[3]
        ],
        "{stdout}"
    );
    assert!(titles[3].starts_with("Dead letter "), "{stdout}");
    assert!(
        pages[0]["url"].as_str().unwrap().ends_with("/login"),
        "the console sent the browser to log in first"
    );

    let dom = |name: &str| std::fs::read_to_string(out.join(format!("{name}.html"))).unwrap();
    for name in ["login", "overview", "dead-letters", "dead-letter"] {
        let png = std::fs::read(out.join(format!("{name}.png"))).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{name}.png is a PNG");
        assert!(png.len() > 5_000, "{name}.png holds a rendered page ({} bytes)", png.len());
    }
    let overview = dom("overview");
    assert!(overview.contains(&app.settings.amqp.dead_letter_queue), "the DLQ row is on the overview");
    assert!(overview.contains("browser-test"), "the operator's name is shown");

    let table = dom("dead-letters");
    assert!(table.contains("<strong id=\"matched\">3</strong> of 3"), "{table}");
    for asset in
        [marked["asset_id"].as_str().unwrap(), other["asset_id"].as_str().unwrap(), "7c0e-not-a-uuid"]
    {
        assert!(table.contains(asset), "{asset} is listed:\n{table}");
    }
    assert!(table.contains("HTTP 404"), "the download failures' reason is shown");
    assert!(table.contains("acme-books/"), "the tenant is shown");

    // The job whose text carries a script tag: in the browser's DOM it is text, the page has no
    // script element, and the title is untouched.
    let detail = dom("dead-letter");
    assert!(detail.contains("&lt;script&gt;document.title='pwned'&lt;/script&gt; Chapter one"), "{detail}");
    assert!(!detail.to_lowercase().contains("<script"), "no script element in the DOM:\n{detail}");
    assert!(!titles.contains(&"pwned"));
    assert!(detail.contains("id=\"failed-event\""), "the audio.failed event is shown");
    drop(console);
    app.teardown().await;
}
