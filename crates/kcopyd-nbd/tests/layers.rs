//! The crate's files read bottom-up: no module imports one that imports it back, directly or
//! through others (docs/DESIGN.md). Checked on the source itself, so that a new file or a new
//! `use crate::` (or `super::` in a folder module) that closes a circle fails here, naming it.

// The helper is the tests crate's public `layers` module, here private to this test.
#[path = "../../../tests/src/layers.rs"]
#[allow(unreachable_pub)]
mod layers;

use std::collections::BTreeMap;
use std::path::Path;

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    layers::assert_bottom_up(&src, &["device", "server/wire"]);
}

#[test]
fn a_folder_module_is_read_with_its_super_imports() {
    let imports = layers::imports(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let of = |module: &str| imports[module].iter().map(String::as_str).collect::<Vec<_>>();
    // `use super::Export; use super::wire::*; use crate::proto::*;`
    assert_eq!(of("server/options"), ["proto", "server", "server/wire"]);
    assert!(of("server/transmission").contains(&"server/options"), "{:?}", of("server/transmission"));
    // `use super::*` of wire.rs's tests is wire itself, not an import.
    assert_eq!(of("server/wire"), ["proto"]);
}

#[test]
fn a_circle_through_a_folder_is_found_and_named() {
    let src = std::env::temp_dir().join(format!("kcopyd-nbd-layers-{}", std::process::id()));
    std::fs::create_dir_all(src.join("b")).unwrap();
    let write = |path: &str, text: &str| std::fs::write(src.join(path), text).unwrap();
    write("lib.rs", "mod a;\nmod b;\n");
    write("a.rs", "// crate::b is named in a comment only\nuse crate::{b::c::C, d::D};\n");
    write("b/mod.rs", "mod c;\nuse crate::b::c::C;\n");
    write("b/c.rs", "use super::B;\n#[cfg(test)]\nmod tests {\n    use super::*;\n}\n");
    write("d.rs", "use crate::a;\n");
    let circles = layers::circles(&src);
    let imports = layers::imports(&src);
    std::fs::remove_dir_all(&src).unwrap();
    let expected: BTreeMap<String, Vec<String>> =
        [("a", vec!["b/c", "d"]), ("b", vec!["b/c"]), ("b/c", vec!["b"]), ("d", vec!["a"])]
            .into_iter()
            .map(|(module, used)| (module.to_owned(), used.into_iter().map(str::to_owned).collect()))
            .collect();
    assert_eq!(imports, expected);
    assert_eq!(layers::named(&circles), "a -> d -> a\nb -> b/c -> b");
}
