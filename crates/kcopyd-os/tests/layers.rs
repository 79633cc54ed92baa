//! The crate's files read bottom-up: no module imports one that imports it back, directly or
//! through others (docs/DESIGN.md, "kcopyd-os, bottom-up"). Checked on the source itself, so
//! that a new file or a new `use crate::` that closes a circle fails here, naming it.

use std::collections::BTreeMap;
use std::path::Path;

/// Each module of `src/` (`lib.rs` aside) and the modules its code names through `crate::`.
fn imports() -> BTreeMap<String, Vec<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut modules = BTreeMap::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if path.extension().is_some_and(|ext| ext == "rs") && name != "lib" {
            modules.insert(name, std::fs::read_to_string(&path).unwrap());
        }
    }
    let names: Vec<String> = modules.keys().cloned().collect();
    modules
        .into_iter()
        .map(|(module, text)| {
            // Code only: comments and doc links name modules without importing them.
            let code: String =
                text.lines().filter(|line| !line.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n");
            let used = names
                .iter()
                .filter(|other| **other != module && code.contains(&format!("crate::{other}")))
                .cloned()
                .collect();
            (module, used)
        })
        .collect()
}

/// The modules in an order where each comes after everything it imports, or the first circle.
fn bottom_up(imports: &BTreeMap<String, Vec<String>>) -> Result<Vec<String>, Vec<String>> {
    fn visit(
        module: &str,
        imports: &BTreeMap<String, Vec<String>>,
        path: &mut Vec<String>,
        order: &mut Vec<String>,
    ) -> Result<(), Vec<String>> {
        if order.iter().any(|done| done == module) {
            return Ok(());
        }
        if let Some(at) = path.iter().position(|on_path| on_path == module) {
            let mut circle = path[at..].to_vec();
            circle.push(module.to_owned());
            return Err(circle);
        }
        path.push(module.to_owned());
        for used in &imports[module] {
            visit(used, imports, path, order)?;
        }
        path.pop();
        order.push(module.to_owned());
        Ok(())
    }
    let mut order = Vec::new();
    for module in imports.keys() {
        visit(module, imports, &mut Vec::new(), &mut order)?;
    }
    Ok(order)
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let imports = imports();
    assert!(imports.contains_key("device") && imports.contains_key("engine"), "the crate's files were found");
    match bottom_up(&imports) {
        Ok(order) => println!("bottom-up: {}", order.join(", ")),
        Err(circle) => panic!("an import circle: {}", circle.join(" -> ")),
    }
}

#[test]
fn a_circle_is_found_and_named() {
    let mut imports = BTreeMap::new();
    imports.insert("device".to_owned(), vec!["engine".to_owned()]);
    imports.insert("engine".to_owned(), vec!["aligned".to_owned(), "device".to_owned()]);
    imports.insert("aligned".to_owned(), vec![]);
    assert_eq!(bottom_up(&imports), Err(vec!["device".into(), "engine".into(), "device".into()]));
    imports.insert("engine".to_owned(), vec!["aligned".to_owned()]);
    assert_eq!(bottom_up(&imports), Ok(vec!["aligned".into(), "engine".into(), "device".into()]));
}
