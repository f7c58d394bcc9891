//! Hostile jobs and real audio of every format (issue 6).
//!
//! Each hostile job must end in the dead-letter queue with the reason the table names, and a
//! listener standing at the forbidden address (127.0.0.1:F, which the jobs reach for in many
//! spellings, through DNS and through redirects) must never see a connection. A raw HTTP server
//! (`Hostile`) plays a misbehaving generation service: lying Content-Length, HTML and JSON
//! served with 200, redirects to forbidden places.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use audio_worker::amqp::headers::HEADER_REASON;
use audio_worker::amqp::headers::header_str;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::helpers::{job, spawn_app_with};

/// Accepts connections and counts them; any connection at all is a test failure.
struct Forbidden {
    port: u16,
    connections: Arc<AtomicUsize>,
}

impl Forbidden {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = connections.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let _ = socket.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno").await;
            }
        });
        Self { port, connections }
    }
}

/// A raw HTTP/1.1 server answering each path with scripted bytes, then closing the connection.
struct Hostile {
    port: u16,
    responses: Arc<Mutex<HashMap<String, Vec<u8>>>>,
}

impl Hostile {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let responses: Arc<Mutex<HashMap<String, Vec<u8>>>> = Arc::default();
        let scripts = responses.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let scripts = scripts.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let line = String::from_utf8_lossy(&head).lines().next().unwrap_or_default().to_owned();
                    let path = line.split(' ').nth(1).unwrap_or_default().to_owned();
                    let response = scripts.lock().unwrap().get(&path).cloned();
                    let response = response
                        .unwrap_or_else(|| b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec());
                    let _ = socket.write_all(&response).await;
                    let _ = socket.shutdown().await;
                });
            }
        });
        Self { port, responses }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Serves `body` at `path` with a Content-Length header of `length` (the real length when
    /// `None`) and the given Content-Type.
    fn serve(&self, path: &str, content_type: &str, length: Option<usize>, body: &[u8]) {
        let mut response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            length.unwrap_or(body.len())
        )
        .into_bytes();
        response.extend_from_slice(body);
        self.responses.lock().unwrap().insert(path.to_owned(), response);
    }

    /// Serves `body` chunked (no Content-Length), in 8 KiB chunks.
    fn serve_chunked(&self, path: &str, body: &[u8]) {
        let mut response =
            b"HTTP/1.1 200 OK\r\nContent-Type: audio/wav\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for chunk in body.chunks(8192) {
            response.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            response.extend_from_slice(chunk);
            response.extend_from_slice(b"\r\n");
        }
        response.extend_from_slice(b"0\r\n\r\n");
        self.responses.lock().unwrap().insert(path.to_owned(), response);
    }

    fn redirect(&self, path: &str, location: &str) {
        let response = format!(
            "HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        self.responses.lock().unwrap().insert(path.to_owned(), response.into_bytes());
    }
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/audio").join(name))
        .unwrap()
}

/// One hostile job: a name, the job body, and what its dead-letter reason must contain.
struct Case {
    name: &'static str,
    job: serde_json::Value,
    reason: &'static str,
}

fn with(field: &str, value: serde_json::Value) -> serde_json::Value {
    let mut job = job("/temp/x.wav");
    job[field] = value;
    job
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_jobs_are_dead_lettered_with_their_reason_and_reach_nothing() {
    let forbidden = Forbidden::start().await;
    let hostile = Hostile::start().await;
    let f = forbidden.port;
    let h = hostile.port;
    // Allowed hosts include the forbidden listener in several forms, so that the address rule
    // (not just the host list) is what stops them; only the stand-in and the hostile server may
    // be private addresses.
    let allowed = format!(
        "{{standin}},127.0.0.1:{h},127.0.0.1:{f},localhost:{f},[::1]:{f},[::ffff:127.0.0.1]:{f},0.0.0.0:{f},\
         169.254.169.254,\
         100.100.100.200,10.0.0.1,172.16.0.1,192.168.0.1,[fd00:ec2::254]"
    );
    let private = format!("{{standin}},127.0.0.1:{h}");
    let app = spawn_app_with(&[
        ("RETRY_MAX_ATTEMPTS", "1"),
        ("RETRY_SCHEDULE", "none"),
        ("MAX_AUDIO_BYTES", "100000"),
        ("AUDIO_URL_ALLOWED_HOSTS", &allowed),
        ("AUDIO_URL_PRIVATE_HOSTS", &private),
    ])
    .await;

    let wav = fixture("tone.wav"); // 24044 bytes
    hostile.serve("/html", "audio/wav", None, b"<!DOCTYPE html><html><body>502 Bad Gateway</body></html>");
    hostile.serve("/json", "audio/x-wav", None, br#"{"error":"file not ready","retry":true}"#);
    hostile.serve("/empty", "audio/wav", Some(0), b"");
    hostile.serve("/big-declared", "audio/wav", Some(200_000), &wav);
    hostile.serve_chunked("/big-chunked", &[wav.as_slice(); 5].concat());
    hostile.serve("/short", "audio/wav", Some(wav.len()), &wav[..wav.len() / 2]);
    hostile.serve("/long", "audio/wav", Some(wav.len() / 2), &wav);
    hostile.serve("/text", "audio/wav", None, b"this is plain text, not audio at all, really not");
    hostile.redirect("/to-loopback", &format!("http://127.0.0.1:{f}/x.wav"));
    hostile.redirect("/to-localhost", &format!("http://localhost:{f}/x.wav"));
    hostile.redirect("/to-decimal", &format!("http://2130706433:{f}/x.wav"));
    hostile.redirect("/to-metadata", "http://169.254.169.254/latest/meta-data/iam/");
    hostile.redirect("/to-unlisted", "http://evil.example/x.wav");
    hostile.redirect("/to-file", "file:///etc/passwd");
    hostile.redirect("/to-creds", &format!("http://user:pw@127.0.0.1:{h}/x.wav"));
    for i in 1..=4 {
        hostile.redirect(&format!("/chain{i}"), &format!("/chain{}", i + 1));
    }
    hostile.serve("/chain5", "audio/wav", None, &wav);

    let url = |u: String| job(&u);
    let cases = vec![
        // Cloud metadata and private ranges, allowed as hosts but not as addresses.
        Case {
            name: "AWS metadata",
            job: url("http://169.254.169.254/latest/meta-data/".into()),
            reason: "cloud metadata",
        },
        Case {
            name: "Alibaba metadata",
            job: url("http://100.100.100.200/latest/meta-data/".into()),
            reason: "cloud metadata",
        },
        Case {
            name: "AWS metadata, IPv6",
            job: url("http://[fd00:ec2::254]/latest/".into()),
            reason: "unique-local",
        },
        Case {
            name: "metadata, decimal",
            job: url("http://2852039166/latest/meta-data/".into()),
            reason: "cloud metadata",
        },
        Case {
            name: "GCP metadata name",
            job: url("http://metadata.google.internal/computeMetadata/v1/".into()),
            reason: "not in AUDIO_URL_ALLOWED_HOSTS",
        },
        Case { name: "10/8", job: url("http://10.0.0.1/x.wav".into()), reason: "private" },
        Case { name: "172.16/12", job: url("http://172.16.0.1/x.wav".into()), reason: "private" },
        Case { name: "192.168/16", job: url("http://192.168.0.1/x.wav".into()), reason: "private" },
        // Loopback in several spellings, all at the forbidden listener.
        Case { name: "loopback", job: url(format!("http://127.0.0.1:{f}/x.wav")), reason: "loopback" },
        Case {
            name: "loopback, decimal",
            job: url(format!("http://2130706433:{f}/x.wav")),
            reason: "loopback",
        },
        Case { name: "loopback, hex", job: url(format!("http://0x7f000001:{f}/x.wav")), reason: "loopback" },
        Case {
            name: "loopback, octal",
            job: url(format!("http://0177.0.0.1:{f}/x.wav")),
            reason: "loopback",
        },
        Case { name: "loopback, short", job: url(format!("http://127.1:{f}/x.wav")), reason: "loopback" },
        Case { name: "loopback, IPv6", job: url(format!("http://[::1]:{f}/x.wav")), reason: "loopback" },
        Case {
            name: "loopback, IPv4-mapped",
            job: url(format!("http://[::ffff:127.0.0.1]:{f}/x.wav")),
            reason: "IPv4-mapped",
        },
        Case { name: "unspecified", job: url(format!("http://0.0.0.0:{f}/x.wav")), reason: "unspecified" },
        Case {
            name: "localhost via DNS",
            job: url(format!("http://localhost:{f}/x.wav")),
            reason: "resolves to 127.0.0.1",
        },
        Case {
            name: "LOCALHOST via DNS",
            job: url(format!("http://LOCALHOST:{f}/x.wav")),
            reason: "resolves to 127.0.0.1",
        },
        Case {
            name: "localhost. (trailing dot)",
            job: url(format!("http://localhost.:{f}/x.wav")),
            reason: "not in AUDIO_URL_ALLOWED_HOSTS",
        },
        Case {
            name: "look-alike host",
            job: url(format!("http://127.0.0.1.nip.io:{f}/x.wav")),
            reason: "not in AUDIO_URL_ALLOWED_HOSTS",
        },
        Case {
            name: "allowed host as a prefix",
            job: url(format!("http://localhost.evil.example:{f}/x.wav")),
            reason: "not in AUDIO_URL_ALLOWED_HOSTS",
        },
        Case {
            name: "unlisted port",
            job: url(format!("http://127.0.0.1:{}/x.wav", f.wrapping_add(1))),
            reason: "not in AUDIO_URL_ALLOWED_HOSTS",
        },
        // Credentials and schemes.
        Case {
            name: "user-info",
            job: url(format!("http://user:pw@127.0.0.1:{h}/html")),
            reason: "user-info",
        },
        Case {
            name: "user-info hiding the host",
            job: url(format!("http://127.0.0.1:{h}@127.0.0.1:{f}/x.wav")),
            reason: "user-info",
        },
        Case { name: "file scheme", job: url("file:///etc/passwd".into()), reason: "scheme file" },
        Case { name: "ftp scheme", job: url(format!("ftp://127.0.0.1:{f}/x.wav")), reason: "scheme ftp" },
        Case {
            name: "gopher scheme",
            job: url(format!("gopher://127.0.0.1:{f}/_GET")),
            reason: "scheme gopher",
        },
        Case {
            name: "scheme-relative",
            job: url(format!("//127.0.0.1:{f}/x.wav")),
            reason: "scheme-relative",
        },
        // Traversal in several encodings.
        Case { name: "dot-dot", job: url("/temp/../../etc/passwd".into()), reason: "dot segments" },
        Case {
            name: "dot-dot, encoded",
            job: url("/temp/%2e%2e/%2e%2e/etc/passwd".into()),
            reason: "dot segments",
        },
        Case { name: "dot-dot, upper-case", job: url("/temp/%2E%2E/secret".into()), reason: "dot segments" },
        Case {
            name: "dot-dot, double-encoded",
            job: url("/temp/%252e%252e/secret".into()),
            reason: "dot segments",
        },
        Case { name: "dot-dot, mixed", job: url("/temp/.%2e/secret".into()), reason: "dot segments" },
        Case { name: "encoded slash", job: url("/temp/..%2fsecret".into()), reason: "dot segments" },
        Case { name: "backslash", job: url("/temp\\..\\secret.wav".into()), reason: "backslash" },
        Case { name: "backslash, encoded", job: url("/temp/%5c..%5csecret.wav".into()), reason: "backslash" },
        Case { name: "NUL", job: url("/temp/x.wav%00.txt".into()), reason: "NUL" },
        Case {
            name: "absolute with dot-dot",
            job: url(format!("http://127.0.0.1:{h}/temp/../html")),
            reason: "dot segments",
        },
        // Bodies that are not what they claim.
        Case { name: "HTML served as audio", job: url(hostile.url("/html")), reason: "an HTML or XML page" },
        Case { name: "JSON served as audio", job: url(hostile.url("/json")), reason: "the body is JSON" },
        Case {
            name: "plain text served as audio",
            job: url(hostile.url("/text")),
            reason: "not a WAV, MP3, Ogg or FLAC",
        },
        Case { name: "empty body", job: url(hostile.url("/empty")), reason: "empty body" },
        Case {
            name: "Content-Length over the limit",
            job: url(hostile.url("/big-declared")),
            reason: "exceeds MAX_AUDIO_BYTES",
        },
        Case {
            name: "chunked body over the limit",
            job: url(hostile.url("/big-chunked")),
            reason: "stopped at",
        },
        Case {
            name: "body shorter than Content-Length",
            job: url(hostile.url("/short")),
            reason: "body after",
        },
        Case {
            name: "body longer than Content-Length",
            job: url(hostile.url("/long")),
            reason: "truncated WAV",
        },
        // Redirects.
        Case {
            name: "redirect to loopback",
            job: url(hostile.url("/to-loopback")),
            reason: "redirect: address 127.0.0.1 is loopback",
        },
        Case {
            name: "redirect to localhost",
            job: url(hostile.url("/to-localhost")),
            reason: "resolves to 127.0.0.1",
        },
        Case {
            name: "redirect to decimal loopback",
            job: url(hostile.url("/to-decimal")),
            reason: "redirect: address 127.0.0.1 is loopback",
        },
        Case {
            name: "redirect to metadata",
            job: url(hostile.url("/to-metadata")),
            reason: "cloud metadata",
        },
        Case {
            name: "redirect to an unlisted host",
            job: url(hostile.url("/to-unlisted")),
            reason: "redirect: host evil.example",
        },
        // reqwest does not follow a redirect to a scheme it does not speak: the 302 is the answer.
        Case { name: "redirect to file:", job: url(hostile.url("/to-file")), reason: "HTTP 302" },
        Case { name: "redirect with credentials", job: url(hostile.url("/to-creds")), reason: "user-info" },
        Case { name: "four redirects", job: url(hostile.url("/chain1")), reason: "more than 3 redirects" },
        // Hostile ids.
        Case {
            name: "customer traversal",
            job: with("customer_id", "../other-tenant".into()),
            reason: "customer_id",
        },
        Case {
            name: "customer with slash",
            job: with("customer_id", "cust/../../x".into()),
            reason: "customer_id",
        },
        Case {
            name: "customer percent-encoded",
            job: with("customer_id", "cust%2F..".into()),
            reason: "customer_id",
        },
        Case {
            name: "customer with NUL",
            job: with("customer_id", "cust\u{0}x".into()),
            reason: "customer_id",
        },
        Case { name: "customer non-ASCII", job: with("customer_id", "cüst".into()), reason: "customer_id" },
        Case { name: "user empty", job: with("user_id", "".into()), reason: "user_id" },
        Case { name: "user too long", job: with("user_id", "u".repeat(129).into()), reason: "user_id" },
        Case { name: "user dot-dot", job: with("user_id", "..".into()), reason: "user_id" },
        Case { name: "asset traversal", job: with("asset_id", "../../x".into()), reason: "asset_id" },
        Case { name: "asset not a string", job: with("asset_id", 42.into()), reason: "invalid job JSON" },
    ];
    assert!(cases.len() >= 40, "{}", cases.len());
    for case in &cases {
        app.publish(&case.job).await;
    }
    let mut dead = Vec::new();
    let deadline = tokio::time::Instant::now() + crate::helpers::WAIT;
    while dead.len() < cases.len() && tokio::time::Instant::now() < deadline {
        dead.extend(app.drain_dlq().await);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(dead.len(), cases.len(), "every hostile job ends in the DLQ");
    let mut failures = Vec::new();
    for case in &cases {
        let body = serde_json::to_vec(&case.job).unwrap();
        let message = dead
            .iter()
            .find(|m| m.delivery.data == body)
            .unwrap_or_else(|| panic!("{}: no dead letter", case.name));
        let reason =
            header_str(message.delivery.properties.headers().as_ref(), HEADER_REASON).unwrap_or_default();
        if !reason.contains(case.reason) {
            failures.push(format!("{}: reason {reason:?} lacks {:?}", case.name, case.reason));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(forbidden.connections.load(Ordering::SeqCst), 0, "a request reached the forbidden address");
    // Nothing was uploaded for any of them.
    let listed = app.list_keys().await.unwrap();
    assert!(listed.is_empty(), "{listed:?}");
    // The redirect chain was followed exactly three times before it was refused.
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_audio_of_every_format_is_stored_under_its_own_extension_and_type() {
    let hostile = Hostile::start().await;
    let h = hostile.port;
    let allowed = format!("{{standin}},127.0.0.1:{h}");
    let mut app =
        spawn_app_with(&[("AUDIO_URL_ALLOWED_HOSTS", &allowed), ("AUDIO_URL_PRIVATE_HOSTS", &allowed)]).await;
    // Whatever the upstream's Content-Type says, the bytes decide.
    let files = [
        ("tone.wav", "audio/wave", "wav", "audio/wav", 1.5),
        ("tone-extensible.wav", "audio/x-wav", "wav", "audio/wav", 1.5),
        ("tone-id3.mp3", "application/octet-stream", "mp3", "audio/mpeg", 1.5),
        ("tone.mp3", "audio/wav", "mp3", "audio/mpeg", 1.5),
        ("tone-vorbis.ogg", "application/octet-stream", "ogg", "audio/ogg", 1.5),
        ("tone-opus.ogg", "audio/opus", "ogg", "audio/ogg", 1.5),
        ("tone.flac", "audio/x-flac", "flac", "audio/flac", 1.5),
        // The producer says 4 s; the file holds 1.5 s: flagged, still saved.
        ("tone.wav", "audio/wav", "wav", "audio/wav", 4.0),
    ];
    let mut jobs = Vec::new();
    for (i, (name, upstream_type, ..)) in files.iter().enumerate() {
        let path = format!("/f{i}/{name}");
        hostile.serve(&path, upstream_type, None, &fixture(name));
        let mut job = job(&hostile.url(&path));
        job["duration"] = files[i].4.into();
        app.publish(&job).await;
        jobs.push(job);
    }
    let outcomes = app.outcomes(jobs.len(), crate::helpers::WAIT).await;
    for (job, (name, _, ext, content_type, duration)) in jobs.iter().zip(files) {
        let asset = job["asset_id"].as_str().unwrap();
        let event = &outcomes[asset][0];
        assert_eq!(event.routing_key, "audio.saved", "{name}: {}", event.json);
        let key = event.json["storage"]["key"].as_str().unwrap();
        assert_eq!(key, format!("cust_42/user-7/audio/{asset}.{ext}"), "{name}");
        assert_eq!(event.json["storage"]["content_type"], content_type, "{name}");
        // The object itself: its bytes and Content-Type, through the presigned URL.
        let response = reqwest::get(event.json["storage"]["url"].as_str().unwrap()).await.unwrap();
        assert_eq!(response.headers()["content-type"], content_type, "{name}");
        assert_eq!(response.bytes().await.unwrap().as_ref(), fixture(name).as_slice(), "{name}");
        let doc = app.document(asset).await.unwrap();
        let measured = doc.get_f64("measured_duration").unwrap();
        assert!((measured - 1.5).abs() < 0.2, "{name}: measured {measured}");
        assert_eq!(doc.get_f64("duration").unwrap(), duration, "{name}");
        assert_eq!(doc.get_bool("duration_mismatch").unwrap(), duration != 1.5, "{name}");
    }
    app.teardown().await;
}
