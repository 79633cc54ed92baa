//! A crate's files read bottom-up: no module imports one that imports it back, directly or
//! through others (docs/DESIGN.md, "kcopyd-os, bottom-up"). Read from the source itself, so
//! that a new file or a new import that closes a circle is named by the crate's `layers` test.
//!
//! ```text
//!  src/**/*.rs ─► modules: "connection", "server" (server/mod.rs), "server/wire", …
//!       │           (lib.rs and main.rs, the crate root, aside)
//!       └─ code lines (comments skipped) ─► `crate::a::b::…` and, outside `mod tests`,
//!          `super::…` ─► the longest module prefix of the path ─► an import
//!  imports ─► depth-first walk ─► an order bottom-up, or the circles it met
//! ```
//!
//! A folder module's `mod.rs` owns its children: its uses of them by relative path
//! (`options::negotiate`) are the declaration of its parts, not imports.
//!
//! Shared by the crates' `tests/layers.rs` through `#[path]` (the crates cannot depend on
//! this one: it depends on them).

use std::collections::BTreeMap;
use std::path::Path;

/// Each module under `src` (the crate root aside, named by its path: `server/wire`) and the
/// modules its code imports.
pub fn imports(src: &Path) -> BTreeMap<String, Vec<String>> {
    let mut files = BTreeMap::new();
    read_modules(src, &mut Vec::new(), &mut files);
    let names: Vec<String> = files.keys().cloned().collect();
    files
        .into_iter()
        .map(|(module, text)| {
            let mut used = uses(&module, &text, &names);
            used.retain(|other| *other != module);
            used.sort();
            used.dedup();
            (module, used)
        })
        .collect()
}

/// Reads the `.rs` files under `dir` (module path `at`) into `files`, by module name.
fn read_modules(dir: &Path, at: &mut Vec<String>, files: &mut BTreeMap<String, String>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|entry| entry.unwrap().path()).collect();
    entries.sort();
    for path in entries {
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            at.push(stem);
            read_modules(&path, at, files);
            at.pop();
            continue;
        }
        if path.extension().is_none_or(|ext| ext != "rs") {
            continue;
        }
        let module = match stem.as_str() {
            "lib" | "main" if at.is_empty() => continue,
            "mod" => at.join("/"),
            _ => at.iter().chain([&stem]).cloned().collect::<Vec<_>>().join("/"),
        };
        files.insert(module, std::fs::read_to_string(&path).unwrap());
    }
}

/// The modules of `names` that `module`'s `text` names through `crate::` or `super::`.
fn uses(module: &str, text: &str, names: &[String]) -> Vec<String> {
    // Code only: comments and doc links name modules without importing them.
    let code: String = text.lines().filter(|line| !line.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n");
    let mut used = Vec::new();
    for path in paths_after(&code, "crate::") {
        used.extend(longest_module(&path, names));
    }
    // `super::` inside `mod tests` is the file itself: only the code before it counts.
    let outside_tests = code.split("\n#[cfg(test)]\nmod tests").next().unwrap_or_default();
    let mut parent: Vec<String> = module.split('/').map(str::to_owned).collect();
    // A file's `super` is its folder's module: `server/wire` -> `server`, `server` -> the root.
    parent.pop();
    for path in paths_after(outside_tests, "super::") {
        let mut base = parent.clone();
        let mut rest = path.as_slice();
        while rest.first().is_some_and(|segment| segment == "super") {
            base.pop();
            rest = &rest[1..];
        }
        base.extend(rest.iter().cloned());
        used.extend(longest_module(&base, names));
    }
    used
}

/// The paths written after each `prefix` in `code`, as segments (`crate::{a::B, c}` gives
/// `[a, B]` and `[c]`).
fn paths_after(code: &str, prefix: &str) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    for (at, _) in code.match_indices(prefix) {
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let rest = &code[at + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let end = group
                .char_indices()
                .find(|&(_, c)| {
                    depth += i32::from(c == '{') - i32::from(c == '}');
                    depth < 0
                })
                .map_or(group.len(), |(end, _)| end);
            paths.extend(split_top_level(&group[..end]).into_iter().map(|item| segments(item.trim())));
        } else {
            paths.push(segments(rest));
        }
    }
    paths
}

/// `items` split at its commas outside braces.
fn split_top_level(items: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0, 0);
    for (at, c) in items.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&items[start..at]);
                start = at + 1;
            }
            _ => {}
        }
    }
    parts.push(&items[start..]);
    parts
}

/// The leading `a::b::c` of `text`, as segments.
fn segments(text: &str) -> Vec<String> {
    let mut segments = Vec::new();
    let mut rest = text;
    loop {
        let len = rest.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(rest.len());
        if len == 0 {
            break;
        }
        segments.push(rest[..len].to_owned());
        match rest[len..].strip_prefix("::") {
            Some(next) => rest = next,
            None => break,
        }
    }
    segments
}

/// The module of `names` that the longest prefix of `path` names, if any.
fn longest_module(path: &[String], names: &[String]) -> Option<String> {
    (1..=path.len()).rev().map(|len| path[..len].join("/")).find(|candidate| names.contains(candidate))
}

/// The modules in an order where each comes after everything it imports, or the first circle.
pub fn bottom_up(imports: &BTreeMap<String, Vec<String>>) -> Result<Vec<String>, Vec<String>> {
    let mut order = Vec::new();
    let mut circles = Vec::new();
    for module in imports.keys() {
        visit(module, imports, &mut Vec::new(), &mut order, &mut circles);
    }
    match circles.into_iter().next() {
        Some(circle) => Err(circle),
        None => Ok(order),
    }
}

/// Every circle a walk of the crate's imports under `src` meets (none: the files read
/// bottom-up), each as `a -> b -> a`.
pub fn circles(src: &Path) -> Vec<Vec<String>> {
    let imports = imports(src);
    let (mut order, mut circles) = (Vec::new(), Vec::new());
    for module in imports.keys() {
        visit(module, &imports, &mut Vec::new(), &mut order, &mut circles);
    }
    for circle in &mut circles {
        // One name per circle, whichever module the walk entered it by: from its least name.
        let least = (0..circle.len() - 1).min_by_key(|&at| &circle[at]).unwrap_or(0);
        let mut turned: Vec<String> = circle[least..circle.len() - 1].to_vec();
        turned.extend(circle[..least].iter().cloned());
        turned.push(turned[0].clone());
        *circle = turned;
    }
    circles.sort();
    circles.dedup();
    circles
}

/// Walks from `module`, adding it to `order` after what it imports; each import back onto
/// `path` is a circle.
fn visit(
    module: &str,
    imports: &BTreeMap<String, Vec<String>>,
    path: &mut Vec<String>,
    order: &mut Vec<String>,
    circles: &mut Vec<Vec<String>>,
) {
    if order.iter().any(|done| done == module) {
        return;
    }
    if let Some(at) = path.iter().position(|on_path| on_path == module) {
        let mut circle = path[at..].to_vec();
        circle.push(module.to_owned());
        circles.push(circle);
        return;
    }
    path.push(module.to_owned());
    for used in &imports[module] {
        visit(used, imports, path, order, circles);
    }
    path.pop();
    order.push(module.to_owned());
}

/// `circles`, one per line, as `a -> b -> a`.
pub fn named(circles: &[Vec<String>]) -> String {
    circles.iter().map(|circle| circle.join(" -> ")).collect::<Vec<_>>().join("\n")
}

/// The check each crate's `tests/layers.rs` makes on its `src`: the modules `expected` are
/// found (so the files were read) and no module imports one that imports it back; prints the
/// bottom-up order.
///
/// # Panics
/// A module of `expected` missing, or a circle, named.
pub fn assert_bottom_up(src: &Path, expected: &[&str]) {
    let imports = imports(src);
    let missing: Vec<&&str> = expected.iter().filter(|module| !imports.contains_key(**module)).collect();
    assert!(missing.is_empty(), "the crate's files were found: {missing:?} missing");
    let circles = circles(src);
    assert!(circles.is_empty(), "import circles:\n{}", named(&circles));
    println!("bottom-up: {}", bottom_up(&imports).unwrap().join(", "));
}
