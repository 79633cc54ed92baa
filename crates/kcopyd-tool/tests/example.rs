//! The `resumable_verified` example, run on real files so that it cannot rot: a first run
//! copies and verifies, a second resumes from the map with nothing left to do.

#[path = "../examples/resumable_verified.rs"]
#[allow(dead_code)]
mod example;

use std::path::PathBuf;

#[test]
fn the_example_copies_to_two_targets_resumes_from_its_map_and_verifies() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("kcopyd-tool-example-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (source, first, second, map) = (dir.join("source"), dir.join("a"), dir.join("b"), dir.join("copy.map"));
    // 1 MiB and 100 bytes: whole blocks through the engine, the partial last one after it.
    let bytes: Vec<u8> = (0..(1 << 20) + 100u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    std::fs::write(&source, &bytes).unwrap();
    assert!(example::copy_resumable_verified(&source, [&first, &second], &map).unwrap());
    for target in [&first, &second] {
        assert!(std::fs::read(target).unwrap() == bytes, "{} holds the source", target.display());
    }
    let recorded = std::fs::read_to_string(&map).unwrap();
    assert!(recorded.contains("\ndone 0 2048\n"), "the map records the whole blocks: {recorded}");
    // Resumed: the map says everything is done; the read-back still runs and agrees.
    std::fs::write(&first, vec![0; bytes.len()]).unwrap();
    assert!(!example::copy_resumable_verified(&source, [&first, &second], &map).unwrap(), "a changed target differs");
    std::fs::remove_dir_all(&dir).unwrap();
}
