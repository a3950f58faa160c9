//! The layout's one rule that a compiler does not check: no two modules
//! reach into each other, directly or around a loop (`crate::a::...` in
//! `b` and `crate::b::...` in `a`). A cycle means two concerns that cannot
//! be understood, or changed, one without the other.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Every module of the crate (`read::lookup`), with the source of its file.
fn modules() -> BTreeMap<String, String> {
    fn walk(dir: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).expect("the crate's sources") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
                let relative = path.strip_prefix(&root).expect("under src");
                let mut parts: Vec<String> = relative
                    .with_extension("")
                    .iter()
                    .map(|p| p.to_string_lossy().into_owned())
                    .collect();
                if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
                    parts.pop();
                }
                let source = std::fs::read_to_string(&path).expect("a source file");
                out.insert(parts.join("::"), source);
            }
        }
    }
    let mut modules = BTreeMap::new();
    walk(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut modules,
    );
    modules
}

/// The modules `source` (of `module`) names by `crate::` or `super::`
/// paths outside comments and tests, by their longest known prefix;
/// its own parents and children left out.
fn uses(module: &str, source: &str, known: &BTreeMap<String, String>) -> BTreeSet<String> {
    let code = source
        .split("#[cfg(test)]\nmod tests")
        .next()
        .unwrap_or_default();
    let mut found = BTreeSet::new();
    let parent = module.rsplit_once("::").map_or("", |(parent, _)| parent);
    for line in code.lines() {
        let line = line.split("//").next().unwrap_or_default();
        for (prefix, base) in [("crate::", String::new()), ("super::", parent.to_owned())] {
            let mut rest = line;
            while let Some(at) = rest.find(prefix) {
                rest = &rest[at + prefix.len()..];
                let path: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                let mut segments: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
                if !base.is_empty() {
                    segments.insert(0, &base);
                }
                while !segments.is_empty() {
                    let candidate = segments.join("::");
                    if known.contains_key(&candidate) {
                        let related = candidate == module
                            || module.starts_with(&format!("{candidate}::"))
                            || candidate.starts_with(&format!("{module}::"));
                        if !related {
                            found.insert(candidate);
                        }
                        break;
                    }
                    segments.pop();
                }
            }
        }
    }
    found
}

/// Every module's uses, by module.
fn edges() -> BTreeMap<String, BTreeSet<String>> {
    let modules = modules();
    let edges: BTreeMap<String, BTreeSet<String>> = modules
        .iter()
        .filter(|(module, _)| !module.is_empty())
        .map(|(module, source)| (module.clone(), uses(module, source, &modules)))
        .collect();
    assert!(edges.len() > 30, "found {} modules", edges.len());
    edges
}

/// A cycle of `edges`, if there is one.
fn first_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    // Depth-first from every module; a module met again on the current
    // path closes a cycle.
    fn visit<'m>(
        module: &'m str,
        edges: &'m BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<&'m str>,
        done: &mut BTreeSet<&'m str>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|m| *m == module) {
            let mut cycle: Vec<String> = path[at..].iter().map(|m| (*m).to_owned()).collect();
            cycle.push(module.to_owned());
            return Some(cycle);
        }
        if !done.insert(module) {
            return None;
        }
        path.push(module);
        for next in edges.get(module).into_iter().flatten() {
            if let Some(cycle) = visit(next, edges, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    edges
        .keys()
        .find_map(|module| visit(module, edges, &mut Vec::new(), &mut done))
}

#[test]
fn no_module_reaches_back_into_a_module_that_uses_it() {
    assert_eq!(first_cycle(&edges()), None, "modules in a cycle");
}

/// The same rule between concerns: the crate's top-level modules and
/// folders (`cache/`, `read/`, `write/`, `tag`, ...), each with all it
/// holds. The handle (`cache/`) is below the paths that extend it: it
/// holds their shared state (flights, the janitor's ledger) but calls
/// none of them.
#[test]
fn no_concern_reaches_back_into_a_concern_that_uses_it() {
    let concern = |module: &str| module.split("::").next().unwrap_or_default().to_owned();
    let mut folded: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, uses) in edges() {
        let from = concern(&module);
        let to = folded.entry(from.clone()).or_default();
        to.extend(uses.iter().map(|used| concern(used)).filter(|c| *c != from));
    }
    assert_eq!(first_cycle(&folded), None, "concerns in a cycle");
}
