//! The layering of issue 13, checked on the source: no import cycle between the top-level
//! modules of src/, and the lower modules (connections, TLS, line and wire readers, the
//! backend clients) import nothing from the protocol cores or the command line.
//!
//! Imports are read as `crate::NAME` paths in non-test code (doc comments and test modules
//! left out), which is how every module here refers to another.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

/// Top-level module -> the top-level modules its non-test code names.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
    let root = stack[0].clone();
    while let Some(path) = stack.pop() {
        if path.is_dir() {
            stack.extend(fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let is_test_file = name.contains("tests")
            || name.starts_with("fake_")
            || name == "testing.rs"
            || name == "memory.rs"
            || name == "transcript.rs";
        if !name.ends_with(".rs") || is_test_file {
            continue;
        }
        let relative = path.strip_prefix(&root).unwrap();
        let parts: Vec<String> = relative
            .components()
            .map(|c| {
                c.as_os_str()
                    .to_string_lossy()
                    .trim_end_matches(".rs")
                    .to_string()
            })
            .collect();
        let top = node(&parts[0], parts.get(1).map(String::as_str));
        let text = fs::read_to_string(&path).unwrap();
        // Test modules come last in a file.
        let code = text.split("#[cfg(test)]").next().unwrap();
        let entry = graph.entry(top.clone()).or_default();
        for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
            for (at, _) in line.match_indices("crate::") {
                let mut path = line[at + 7..].split("::").map(|part| {
                    part.chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect::<String>()
                });
                let first = path.next().unwrap_or_default();
                let name = node(&first, path.next().as_deref());
                if !first.is_empty() && name != top {
                    entry.insert(name);
                }
            }
        }
    }
    graph
}

/// The graph's node for a path: its top-level module, except that an `admin` submodule
/// (the `oauth2` and `queue` admin subcommands) is a node of its own, at the command
/// line's level, so that the library half of its module is judged by what it imports.
fn node(top: &str, second: Option<&str>) -> String {
    match second {
        Some("admin") => format!("{top}::admin"),
        _ => top.to_string(),
    }
}

fn reachable(graph: &BTreeMap<String, BTreeSet<String>>, from: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut stack = vec![from.to_string()];
    while let Some(module) = stack.pop() {
        for next in graph.get(&module).into_iter().flatten() {
            if seen.insert(next.clone()) {
                stack.push(next.clone());
            }
        }
    }
    seen
}

#[test]
fn no_import_cycle_between_top_level_modules() {
    let graph = imports();
    assert!(graph.len() > 10, "src/ not read: {graph:?}");
    let cycles: Vec<String> = graph
        .keys()
        .filter(|m| reachable(&graph, m).contains(*m))
        .cloned()
        .collect();
    assert!(
        cycles.is_empty(),
        "modules on an import cycle: {cycles:?}\n{graph:#?}"
    );
}

#[test]
fn lower_modules_import_nothing_from_the_cores_or_the_command_line() {
    let graph = imports();
    let upper = [
        "cli",
        "options",
        "pop3",
        "smtp",
        "tunnel",
        "frontend",
        "main",
        "oauth2::admin",
    ];
    for lower in [
        "net",
        "tls",
        "lines",
        "imap_wire",
        "smtp_wire",
        "imap",
        "submission",
        "starttls",
        "calendar",
        "base64",
        "secret",
    ] {
        assert!(graph.contains_key(lower), "no module {lower}: {graph:?}");
        let reached = reachable(&graph, lower);
        let bad: Vec<&&str> = upper.iter().filter(|u| reached.contains(**u)).collect();
        assert!(
            bad.is_empty(),
            "{lower} reaches {bad:?}: {:?}",
            graph[lower]
        );
    }
}
