//! The module layout the code promises (README, "Development"): data flows one way, delivery →
//! job → stages → outcome → ack. No module of `src/` imports a module that imports it back, the
//! stages and the health endpoints never reach up to the processor, the processor names no AMQP
//! type, and the domain types (`asset`, `audio`, `events`) depend on no stage. Comment lines
//! (doc links included) are not imports.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// `src/a/b.rs` → `a::b`, `src/a/mod.rs` → `a`.
fn module_of(path: &Path, src: &Path) -> String {
    let relative = path.strip_prefix(src).unwrap().with_extension("");
    let name = relative.to_string_lossy().replace('/', "::");
    name.strip_suffix("::mod").map(str::to_owned).unwrap_or(name)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Each module's code, without its tests and comment lines.
fn modules() -> BTreeMap<String, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            let code: Vec<&str> = code.lines().filter(|l| !l.trim_start().starts_with("//")).collect();
            (module_of(&path, &src), code.join("\n"))
        })
        .collect()
}

/// The modules each module names with `crate::…` or `super::…`.
fn imports(modules: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let word = |s: &str| s.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>();
    modules
        .iter()
        .map(|(name, code)| {
            let mut used = BTreeSet::new();
            for rest in code.split("crate::").skip(1) {
                let first = word(rest);
                let second = rest.strip_prefix(&format!("{first}::")).map(word).unwrap_or_default();
                let nested = format!("{first}::{second}");
                used.insert(if modules.contains_key(&nested) { nested } else { first });
            }
            let parent = name.rsplit_once("::").map(|(p, _)| p.to_owned());
            for rest in code.split("super::").skip(1) {
                let names: Vec<String> = match rest.strip_prefix('{') {
                    Some(list) => {
                        list.split('}').next().unwrap().split(',').map(|n| word(n.trim())).collect()
                    }
                    None => vec![word(rest)],
                };
                for n in names {
                    used.insert(parent.as_ref().map_or(n.clone(), |p| format!("{p}::{n}")));
                }
            }
            used.retain(|m| modules.contains_key(m) && m != name);
            (name.clone(), used)
        })
        .collect()
}

#[test]
fn no_module_imports_a_module_that_imports_it_back() {
    let graph = imports(&modules());
    fn reaches(
        graph: &BTreeMap<String, BTreeSet<String>>,
        from: &str,
        to: &str,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        graph[from]
            .iter()
            .any(|next| next == to || (seen.insert(next.clone()) && reaches(graph, next, to, seen)))
    }
    let loops: Vec<String> = graph
        .iter()
        .flat_map(|(m, used)| used.iter().map(move |u| (m, u)))
        .filter(|(m, u)| reaches(&graph, u, m, &mut BTreeSet::new()))
        .map(|(m, u)| format!("{m} -> {u} -> … -> {m}"))
        .collect();
    assert!(loops.is_empty(), "import loops: {loops:#?}");
    // The graph is real: the consumer does import the processor and the headers.
    assert!(
        graph["amqp::consumer"].contains("processor") && graph["amqp::consumer"].contains("amqp::headers")
    );
}

#[test]
fn stages_health_and_domain_types_do_not_reach_up() {
    let graph = imports(&modules());
    for (module, used) in &graph {
        let is_stage = module.starts_with("pipeline::");
        if is_stage || module == "health" {
            assert!(!used.contains("processor"), "{module} imports the processor: {used:?}");
            assert!(!used.iter().any(|u| u.starts_with("amqp")), "{module} imports AMQP: {used:?}");
        }
        if ["asset", "audio", "audio::format", "audio::measure", "events", "retry", "error", "job"]
            .contains(&module.as_str())
        {
            let stages: Vec<&String> =
                used.iter().filter(|u| u.starts_with("pipeline") || *u == "processor").collect();
            assert!(stages.is_empty(), "domain module {module} imports {stages:?}");
        }
    }
}

#[test]
fn the_processor_names_no_amqp_type() {
    let modules = modules();
    let processor = &modules["processor"];
    assert!(!processor.contains("lapin"), "src/processor.rs names lapin");
    assert!(!imports(&modules)["processor"].iter().any(|m| m.starts_with("amqp")));
}
