//! The policy's modules import one way: the graph drawn from `crate::` and
//! `super::` paths in non-test code (each file read up to its first
//! `#[cfg(test)]`) has no circle, at the level of top-level modules or of
//! files. The module map in `src/lib.rs` describes this graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `compile::providers` for `src/compile/providers.rs`, `credential` for
/// `src/credential/mod.rs`, `lib` for `src/lib.rs`.
fn node(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap_or(file).with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    if parts.is_empty() {
        "lib".to_string()
    } else {
        parts.join("::")
    }
}

/// The first path segment of each item after `prefix` (`prefix::x` and
/// `prefix::{x, y::z}`).
fn segments(code: &str, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (at, _) in code.match_indices(prefix) {
        let rest = &code[at + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            out.extend(group.split(',').filter_map(|g| g.trim().split("::").next()).map(str::to_string));
        } else {
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            out.push(name);
        }
    }
    out.retain(|s| !s.is_empty() && s.starts_with(|c: char| c.is_ascii_lowercase()));
    out
}

fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut all = Vec::new();
    files(src, &mut all);
    let nodes: BTreeSet<String> = all.iter().map(|f| node(src, f)).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &all {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let code: String =
            code.lines().map(|l| l.split("//").next().unwrap_or_default()).collect::<Vec<_>>().join("\n");
        let me = node(src, file);
        if me == "lib" {
            continue;
        }
        let parent = me.rsplit_once("::").map(|(p, _)| p.to_string());
        let mut targets: BTreeSet<String> = segments(&code, "crate::").into_iter().collect();
        for sub in segments(&code, "super::") {
            let sibling = parent.as_ref().map(|p| format!("{p}::{sub}"));
            targets.insert(sibling.filter(|s| nodes.contains(s)).or(parent.clone()).unwrap_or(sub));
        }
        // A module's own children, used by a relative path (`use env::x`).
        for line in code.lines() {
            let decl = line.trim().trim_start_matches("pub ");
            if let Some(child) = decl.strip_prefix("mod ").and_then(|c| c.strip_suffix(';')) {
                if code.contains(&format!("{child}::")) {
                    targets.insert(format!("{me}::{child}"));
                }
            }
        }
        for target in targets {
            if target != me && !me.starts_with(&format!("{target}::")) {
                edges.entry(me.clone()).or_default().insert(target);
            }
        }
    }
    edges
}

fn circles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<(String, String)> {
    let reaches = |from: &str, to: &str| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.to_string()];
        while let Some(n) = stack.pop() {
            for next in edges.get(&n).into_iter().flatten() {
                if next == to {
                    return true;
                }
                if seen.insert(next.clone()) {
                    stack.push(next.clone());
                }
            }
        }
        false
    };
    let mut out = Vec::new();
    for (a, targets) in edges {
        for b in targets {
            if a < b && reaches(b, a) {
                out.push((a.clone(), b.clone()));
            }
        }
    }
    out
}

#[test]
fn modules_import_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let files = graph(&src);
    assert!(files.contains_key("decide") && files.contains_key("compile"), "the graph was read: {files:?}");
    let mut modules: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let top = |n: &str| n.split("::").next().unwrap_or(n).to_string();
    for (a, targets) in &files {
        for b in targets {
            if top(a) != top(b) {
                modules.entry(top(a)).or_default().insert(top(b));
            }
        }
    }
    let drawn: Vec<String> = modules.iter().map(|(a, b)| format!("{a} -> {b:?}")).collect();
    assert_eq!(circles(&modules), [], "module circles in\n{}", drawn.join("\n"));
    assert_eq!(circles(&files), [], "file circles in {files:#?}");
    // The leaves stay leaves; the document as written and the dynamic
    // credentials read JSON and nothing else of the crate.
    for leaf in ["json", "edit", "query", "time"] {
        assert_eq!(modules.get(leaf), None, "`{leaf}` imports from the crate");
    }
    for reader in ["raw", "credential"] {
        let only_json = modules.get(reader).is_none_or(|to| to.iter().all(|m| m == "json"));
        assert!(only_json, "`{reader}` imports {:?} from the crate", modules.get(reader));
    }
}
