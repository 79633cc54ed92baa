//! The crate's files read bottom-up: no module imports one that imports it back, directly or
//! through others (docs/DESIGN.md, "kcopyd-os, bottom-up"). Checked on the source itself, so
//! that a new file or a new `use crate::` that closes a circle fails here, naming it.

// The helper is the tests crate's public `layers` module, here private to this test.
#[path = "../../../tests/src/layers.rs"]
#[allow(unreachable_pub)]
mod layers;

use std::collections::BTreeMap;
use std::path::Path;

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    layers::assert_bottom_up(&src, &["device", "engine"]);
}

#[test]
fn a_circle_is_found_and_named() {
    let mut imports = BTreeMap::new();
    imports.insert("device".to_owned(), vec!["engine".to_owned()]);
    imports.insert("engine".to_owned(), vec!["aligned".to_owned(), "device".to_owned()]);
    imports.insert("aligned".to_owned(), vec![]);
    assert_eq!(layers::bottom_up(&imports), Err(vec!["device".into(), "engine".into(), "device".into()]));
    imports.insert("engine".to_owned(), vec!["aligned".to_owned()]);
    assert_eq!(layers::bottom_up(&imports), Ok(vec!["aligned".into(), "engine".into(), "device".into()]));
}
