use kcopyd_tests::scenario::{Inputs, run};
#[test]
fn scratch() {
    for seed in [62u64, 121, 257] {
    let inputs = Inputs::aimed(seed);
    let s = inputs.layout();
    println!("seed {seed} timeout {:?} stalls {:?}", s.config.io_timeout_ms, inputs.sources.iter().chain(&inputs.targets).map(|d| d.faults.stalls.clone()).collect::<Vec<_>>());
    let r = run(&s);
    let t = s.config.io_timeout_ms.map(|m| m * 1000);
    for rec in &r.io { let life = rec.done_us.saturating_sub(rec.issued_us); if t.is_some_and(|t| life + 1000 >= t) || rec.done_us == u64::MAX { println!("  {:?}", rec); } }
    println!("  marks {:?}", r.marks.iter().zip(&r.mark_us).filter(|((_, m), _)| matches!(m, kcopyd_tests::io_log::Mark::ShutdownBegun | kcopyd_tests::io_log::Mark::ShutdownReturned)).collect::<Vec<_>>());
    println!("  reports {:?}", r.shutdown_reports);
    }
}
