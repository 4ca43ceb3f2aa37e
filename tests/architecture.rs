//! The architecture's two claims, checked on the sources (plain `cargo test`, no service):
//!
//! - **No cycles**: no module refers to one that refers back to it, directly or through
//!   others; neither between files nor between the top-level modules (`events`, `outbox`,
//!   `coupons`, …).
//! - **The runtime knows no business**: `actors/`, `kafka/`, `outbox/` and `event_log/` refer
//!   to no slice (`coupons/`, `shop/`, `ranking/`, `delivery/`) and not to `api/` or the
//!   wiring.
//!
//! A reference is any `crate::…` path in a file (a `use`, a path in code, or a link in a
//! documentation comment: a reader follows those too) and any `super::…` path; unit-test
//! modules at the end of a file (`#[cfg(test)] mod tests`) are left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const RUNTIME: [&str; 4] = ["actors", "kafka", "outbox", "event_log"];
const SLICES: [&str; 4] = ["coupons", "shop", "ranking", "delivery"];
const ABOVE_THE_SLICES: [&str; 2] = ["api", "startup"];

/// A module's path inside the crate, e.g. `["actors", "partition"]`; the crate root is `[]`.
type ModulePath = Vec<String>;

#[test]
fn no_module_refers_to_one_that_refers_back_to_it() {
    let graph = ModuleGraph::of_crate();
    let cycles = graph.cycles();
    assert!(
        cycles.is_empty(),
        "modules in a cycle (each refers, directly or not, to every other):\n{}",
        describe(&cycles, &graph)
    );
}

#[test]
fn no_top_level_module_refers_to_one_that_refers_back_to_it() {
    let graph = ModuleGraph::of_crate().top_level();
    let cycles = graph.cycles();
    assert!(
        cycles.is_empty(),
        "top-level modules in a cycle:\n{}",
        describe(&cycles, &graph)
    );
}

#[test]
fn the_runtime_refers_to_no_slice() {
    let graph = ModuleGraph::of_crate();
    let mut violations = Vec::new();
    for (module, references) in &graph.edges {
        if !module
            .first()
            .is_some_and(|top| RUNTIME.contains(&top.as_str()))
        {
            continue;
        }
        for target in references {
            let top = target.first().map(String::as_str).unwrap_or_default();
            if SLICES.contains(&top) || ABOVE_THE_SLICES.contains(&top) {
                violations.push(format!(
                    "{} refers to {}",
                    graph.file_of(module),
                    target.join("::")
                ));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "the runtime must know no slice:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_checker_sees_references_in_use_groups_paths_and_documentation() {
    let known: BTreeSet<ModulePath> = [
        vec![],
        vec!["events".to_string()],
        vec!["outbox".to_string()],
        vec!["outbox".to_string(), "relay".to_string()],
        vec!["common".to_string()],
        vec!["common".to_string(), "ids".to_string()],
        vec!["coupons".to_string()],
    ]
    .into_iter()
    .collect();
    let source = "use crate::{common::ids::UserId, events::{EventId, topics}};\n\
                  /// See [`crate::coupons`].\n\
                  fn f() { super::relay::go(); crate::outbox::Outbox::new(); }\n\
                  #[cfg(test)]\nmod tests { use crate::common; }\n";
    let module = vec!["outbox".to_string(), "reconciler".to_string()];
    let references = references_in(source, &module, &known);
    let names: Vec<String> = references.iter().map(|path| path.join("::")).collect();
    assert_eq!(
        names,
        vec![
            "common::ids",
            "coupons",
            "events",
            "outbox",
            "outbox::relay"
        ]
    );
}

struct ModuleGraph {
    files: BTreeMap<ModulePath, PathBuf>,
    edges: BTreeMap<ModulePath, BTreeSet<ModulePath>>,
}

impl ModuleGraph {
    fn of_crate() -> Self {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = BTreeMap::new();
        collect_modules(&root, &root, &mut files);
        let known: BTreeSet<ModulePath> = files.keys().cloned().collect();
        let mut edges = BTreeMap::new();
        for (module, file) in &files {
            let source = std::fs::read_to_string(file).expect("a source file is readable");
            let references = references_in(&source, module, &known)
                .into_iter()
                .filter(|target| target != module && !target.is_empty())
                .collect();
            edges.insert(module.clone(), references);
        }
        Self { files, edges }
    }

    /// The same graph between the top-level modules (`events`, `outbox`, …).
    fn top_level(&self) -> Self {
        let top = |module: &ModulePath| -> ModulePath { module.iter().take(1).cloned().collect() };
        let mut files = BTreeMap::new();
        let mut edges: BTreeMap<ModulePath, BTreeSet<ModulePath>> = BTreeMap::new();
        for (module, file) in &self.files {
            // A folder module is named by its folder.
            let named = match module.len() {
                0 | 1 if file.ends_with("mod.rs") => file.parent().map(Path::to_path_buf),
                0 | 1 => Some(file.clone()),
                _ => None,
            };
            if let Some(named) = named {
                files.insert(top(module), named);
            }
            let entry = edges.entry(top(module)).or_default();
            for target in &self.edges[module] {
                if top(target) != top(module) {
                    entry.insert(top(target));
                }
            }
        }
        Self { files, edges }
    }

    fn file_of(&self, module: &ModulePath) -> String {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let file = &self.files[module];
        file.strip_prefix(manifest)
            .unwrap_or(file)
            .display()
            .to_string()
    }

    /// The strongly connected components of more than one module (Tarjan).
    fn cycles(&self) -> Vec<Vec<ModulePath>> {
        struct Walk<'a> {
            graph: &'a ModuleGraph,
            index: BTreeMap<&'a ModulePath, usize>,
            low: BTreeMap<&'a ModulePath, usize>,
            stack: Vec<&'a ModulePath>,
            on_stack: BTreeSet<&'a ModulePath>,
            next: usize,
            found: Vec<Vec<ModulePath>>,
        }
        impl<'a> Walk<'a> {
            fn visit(&mut self, module: &'a ModulePath) {
                self.index.insert(module, self.next);
                self.low.insert(module, self.next);
                self.next += 1;
                self.stack.push(module);
                self.on_stack.insert(module);
                for target in &self.graph.edges[module] {
                    if !self.graph.edges.contains_key(target) {
                        continue;
                    }
                    if !self.index.contains_key(target) {
                        self.visit(target);
                        let low = self.low[module].min(self.low[target]);
                        self.low.insert(module, low);
                    } else if self.on_stack.contains(target) {
                        let low = self.low[module].min(self.index[target]);
                        self.low.insert(module, low);
                    }
                }
                if self.low[module] == self.index[module] {
                    let mut component = Vec::new();
                    while let Some(member) = self.stack.pop() {
                        self.on_stack.remove(member);
                        component.push(member.clone());
                        if member == module {
                            break;
                        }
                    }
                    if component.len() > 1 {
                        component.sort();
                        self.found.push(component);
                    }
                }
            }
        }
        let mut walk = Walk {
            graph: self,
            index: BTreeMap::new(),
            low: BTreeMap::new(),
            stack: Vec::new(),
            on_stack: BTreeSet::new(),
            next: 0,
            found: Vec::new(),
        };
        for module in self.edges.keys() {
            if !walk.index.contains_key(module) {
                walk.visit(module);
            }
        }
        walk.found
    }
}

fn describe(cycles: &[Vec<ModulePath>], graph: &ModuleGraph) -> String {
    let mut text = String::new();
    for cycle in cycles {
        let members: BTreeSet<&ModulePath> = cycle.iter().collect();
        text.push_str("- cycle:\n");
        for module in cycle {
            for target in &graph.edges[module] {
                if members.contains(target) {
                    text.push_str(&format!(
                        "    {} -> {}\n",
                        graph.file_of(module),
                        target.join("::")
                    ));
                }
            }
        }
    }
    text
}

fn collect_modules(root: &Path, folder: &Path, files: &mut BTreeMap<ModulePath, PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(folder)
        .expect("the source folder is readable")
        .map(|entry| entry.expect("a folder entry").path())
        .collect();
    entries.sort();
    for path in entries {
        let relative = path.strip_prefix(root).expect("under src/");
        if path.is_dir() {
            // src/bin holds binaries of their own, not modules of the library.
            if relative != Path::new("bin") {
                collect_modules(root, &path, files);
            }
            continue;
        }
        if path.extension().is_none_or(|extension| extension != "rs") {
            continue;
        }
        let mut module: ModulePath = relative
            .with_extension("")
            .components()
            .map(|part| part.as_os_str().to_string_lossy().into_owned())
            .collect();
        match module.last().map(String::as_str) {
            Some("mod") | Some("lib") => {
                module.pop();
            }
            Some("main") if module.len() == 1 => continue,
            _ => {}
        }
        files.insert(module, path);
    }
}

/// The modules `source` (the text of `module`'s file) refers to, resolved to the longest
/// known module path.
fn references_in(
    source: &str,
    module: &ModulePath,
    known: &BTreeSet<ModulePath>,
) -> BTreeSet<ModulePath> {
    let source = match source.find("#[cfg(test)]\nmod tests") {
        Some(start) => &source[..start],
        None => source,
    };
    let super_base: ModulePath = module[..module.len().saturating_sub(1)].to_vec();
    let mut references = BTreeSet::new();
    for (anchor, base) in [("crate::", Vec::new()), ("super::", super_base)] {
        let mut rest = source;
        while let Some(position) = rest.find(anchor) {
            // `$crate::` (a macro's path) counts; `foocrate::` is another name.
            let preceded_by_name = rest[..position]
                .chars()
                .next_back()
                .is_some_and(|character| character.is_alphanumeric() || character == '_');
            rest = &rest[position + anchor.len()..];
            if preceded_by_name {
                continue;
            }
            for path in expand_path(rest) {
                let mut full = base.clone();
                full.extend(path);
                if let Some(resolved) = longest_known(&full, known) {
                    references.insert(resolved);
                }
            }
        }
    }
    references
}

/// The paths written at the start of `text` (just after `crate::`): `a::b::C` or a use group
/// `{a::b, c::{d, e}}`, each as its segments.
fn expand_path(text: &str) -> Vec<Vec<String>> {
    let mut segments = Vec::new();
    let mut rest = text;
    loop {
        let length = rest
            .find(|character: char| !(character.is_alphanumeric() || character == '_'))
            .unwrap_or(rest.len());
        if length > 0 {
            segments.push(rest[..length].to_string());
            rest = &rest[length..];
        }
        if let Some(after) = rest.strip_prefix("::") {
            rest = after;
            continue;
        }
        if rest.starts_with('{') {
            let Some(group) = balanced_group(rest) else {
                return vec![segments];
            };
            let mut paths = Vec::new();
            for item in split_top_level(&group) {
                let item = item.trim();
                if item.is_empty() || item == "self" || item == "*" {
                    paths.push(segments.clone());
                    continue;
                }
                for inner in expand_path(item) {
                    let mut path = segments.clone();
                    path.extend(inner);
                    paths.push(path);
                }
            }
            return paths;
        }
        return vec![segments];
    }
}

/// The text inside the braces `text` starts with.
fn balanced_group(text: &str) -> Option<String> {
    let mut depth = 0;
    for (position, character) in text.char_indices() {
        match character {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(text[1..position].to_string());
                }
            }
            _ => {}
        }
    }
    None
}

fn split_top_level(group: &str) -> Vec<String> {
    let mut items = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (position, character) in group.char_indices() {
        match character {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(group[start..position].to_string());
                start = position + 1;
            }
            _ => {}
        }
    }
    items.push(group[start..].to_string());
    items
}

fn longest_known(path: &[String], known: &BTreeSet<ModulePath>) -> Option<ModulePath> {
    (0..=path.len())
        .rev()
        .map(|length| path[..length].to_vec())
        .find(|prefix| known.contains(prefix))
}
