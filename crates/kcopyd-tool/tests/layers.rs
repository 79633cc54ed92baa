//! The crate's files read bottom-up: no module imports one that imports it back, directly or
//! through others (docs/DESIGN.md). Checked on the source itself, so that a new file or a new
//! `use crate::` (or `super::` in a folder module) that closes a circle fails here, naming it.

// The helper is the tests crate's public `layers` module, here private to this test.
#[path = "../../../tests/src/layers.rs"]
#[allow(unreachable_pub, dead_code)]
mod layers;

use std::path::Path;

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    layers::assert_bottom_up(&src, &["open", "plan"]);
}
