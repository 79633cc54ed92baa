//! The plan's typed errors and the runner, on simulated disks: copy with read-back, zero,
//! verify finding a difference, progress events, and a cancelled token.

use std::cell::RefCell;
use std::sync::Arc;

use kcopyd_core::{ClientConfig, Device, Flags, RangeSet};
use kcopyd_sim::MemDisk;
use kcopyd_tool::run::{CopyOptions, Event, Runner};
use kcopyd_tool::{
    Backend, Cancel, DeviceAddress, DeviceProblem, PlanError, Role, Settings, SimDisk, plan_with_source, plan_zero,
};

/// A simulated disk made already: every open of its address gives the same disk.
#[derive(Debug)]
struct Made(Device);

impl SimDisk for Made {
    fn len_bytes(&self) -> Option<u64> {
        Some(self.0.geometry().len_sectors * 512)
    }
    fn headers_only(&self) -> bool {
        false
    }
    fn check_len(&self, _: u64) -> Result<(), kcopyd_sim::spec::SpecError> {
        Ok(())
    }
    fn build(&self, _: u64) -> Device {
        self.0.clone()
    }
}

fn address(name: &str, disk: &Arc<MemDisk>, offset_bytes: u64) -> DeviceAddress {
    DeviceAddress { text: name.into(), backend: Backend::Sim(Arc::new(Made(disk.clone()))), offset_bytes }
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(future)
}

#[test]
fn the_plan_refuses_with_errors_naming_the_device_or_the_length() {
    let settings = Settings::new(ClientConfig::default());
    let disk = Arc::new(MemDisk::with_pattern("a", 64, 512, 1));
    let overlap = plan_with_source(&address("s", &disk, 0), &[address("t", &disk, 4096)], Some(8192), true, &settings);
    let Err(PlanError::Device { role: Role::Target, text, problem }) = overlap else { panic!("{overlap:?}") };
    assert!(text == "t" && problem.to_string().contains("overlaps SOURCE 's'"), "{problem}");
    let ranges = [[4096, 12288], [0, 8192]];
    assert!(
        matches!(problem, DeviceProblem::OverlapsDevice { other_role: Role::Source, ranges: r, .. } if r == ranges)
    );
    let small = Arc::new(MemDisk::zeroed("small", 8, 512));
    let too_small = plan_with_source(&address("s", &disk, 0), &[address("small", &small, 0)], None, true, &settings);
    assert!(
        matches!(too_small, Err(PlanError::Device { role: Role::Target, problem: ref problem @ DeviceProblem::TooSmall { device_bytes: 4096, .. }, .. }) if problem.to_string().contains("too small"))
    );
    let large_blocks = Arc::new(MemDisk::zeroed("4k", 64, 4096));
    let misaligned = plan_zero(&[address("4k", &large_blocks, 0)], Some(1000), &settings);
    assert!(matches!(misaligned, Err(PlanError::Length { len_bytes: 1000, .. })), "{misaligned:?}");
    let many: Vec<DeviceAddress> = (0..129).map(|i| address(&format!("t{i}"), &small, 0)).collect();
    let count = plan_zero(&many, None, &settings);
    assert!(matches!(count, Err(PlanError::TargetCount { count: 129 })), "{count:?}");
}

#[test]
fn the_runner_copies_and_reads_back_zeroes_and_verify_finds_the_difference() {
    let settings = Settings::new(ClientConfig { page_budget: 64, ..ClientConfig::default() });
    let source = Arc::new(MemDisk::with_pattern("source", 2048, 512, 7));
    let targets = [Arc::new(MemDisk::zeroed("a", 2048, 512)), Arc::new(MemDisk::zeroed("b", 4096, 512))];
    let addresses = [address("a", &targets[0], 0), address("b", &targets[1], 1 << 20)];
    let mut plan = plan_with_source(&address("source", &source, 0), &addresses, None, true, &settings).unwrap();
    let events = RefCell::new(Vec::new());
    let on_event = |event: Event<'_>| match event {
        Event::Started { phase, .. } => events.borrow_mut().push(format!("start {}", phase.name())),
        Event::Progress { done_bytes } => events.borrow_mut().push(format!("{done_bytes}")),
        Event::Job { .. } => events.borrow_mut().push("job".into()),
        Event::Finished { phase } => events.borrow_mut().push(format!("end {}", phase.name())),
    };
    let cancel = Cancel::new();
    let runner = Runner { settings: &settings, on_event: &on_event, cancel: &cancel };
    let options = CopyOptions { verify: true, ..CopyOptions::default() };
    let run = block_on(runner.copy(&mut plan, options, None)).unwrap();
    assert!(kcopyd_tool::run::job_ok(&run.job.outcome) && !run.job.cancelled);
    assert_eq!(run.job.done_bytes, 1 << 20);
    let verify = run.verify.expect("asked for");
    assert!(verify.comparison.identical() && verify.bytes == 1 << 20, "{verify:?}");
    assert!(targets[1].snapshot(2048, 2048) == source.snapshot(0, 2048));
    let events = events.borrow().clone();
    let at = |what: &str| events.iter().position(|e| e == what).unwrap_or_else(|| panic!("{what}: {events:?}"));
    assert!(at("start copy") < at("job") && at("job") < at("end copy") && at("end copy") < at("start verify"));
    assert_eq!(events[at("end verify") - 1], (1u64 << 20).to_string(), "the last progress is the whole range");
    // Zero 8 sectors of the second target, then verify finds exactly them there.
    let zero = plan_zero(&[address("b", &targets[1], (1 << 20) + 4096)], Some(4096), &settings).unwrap();
    let zeroed = block_on(runner.zero(&zero, Flags::empty())).unwrap();
    assert!(kcopyd_tool::run::job_ok(&zeroed.outcome) && zeroed.done_bytes == 4096);
    let plan = plan_with_source(&address("source", &source, 0), &addresses, None, false, &settings).unwrap();
    let found = block_on(runner.verify(&plan)).unwrap().comparison;
    assert!(found.targets[0].identical() && found.source_unreadable.is_empty());
    assert_eq!((found.targets[1].differing_blocks, &found.targets[1].differing), (8, &RangeSet::from_range(8..16)));
}

#[test]
fn a_cancelled_token_cancels_the_copy_and_skips_the_read_back() {
    // 64 MiB through 16 KiB of pages, one sub-job at a time: the token's cancellation reaches
    // the job long before it could have started every sub-job, however the threads are
    // scheduled (with 2 MiB and the default budget, a loaded machine let the worker start both
    // sub-jobs before the cancellation arrived, and the outcome said nothing was left out).
    let settings = Settings::new(ClientConfig { page_budget: 4, subjobs_in_flight: 1, ..ClientConfig::default() });
    let source = Arc::new(MemDisk::with_pattern("source", 131_072, 512, 3));
    let target = Arc::new(MemDisk::zeroed("t", 131_072, 512));
    let addresses = [address("t", &target, 0)];
    let mut plan = plan_with_source(&address("source", &source, 0), &addresses, None, true, &settings).unwrap();
    let cancel = Cancel::new();
    cancel.cancel();
    let runner = Runner { settings: &settings, on_event: &|_| {}, cancel: &cancel };
    let options = CopyOptions { verify: true, ..CopyOptions::default() };
    let run = block_on(runner.copy(&mut plan, options, None)).unwrap();
    assert!(run.job.cancelled && run.job.outcome.cancelled && run.verify.is_none());
    assert!(!run.job.outcome.targets[0].not_copied.is_empty(), "what was not copied is reported");
}

#[test]
fn the_reports_of_runs_carry_their_status_exit_code_and_per_device_ranges() {
    let settings = Settings::new(ClientConfig { page_budget: 64, ..ClientConfig::default() });
    let source = Arc::new(MemDisk::with_pattern("source", 2048, 512, 7));
    let target = Arc::new(MemDisk::zeroed("t", 4096, 512));
    let addresses = [address("t", &target, 1 << 20)];
    let mut plan = plan_with_source(&address("source", &source, 0), &addresses, None, true, &settings).unwrap();
    let cancel = Cancel::new();
    let runner = Runner { settings: &settings, on_event: &|_| {}, cancel: &cancel };
    let options = CopyOptions { verify: true, ..CopyOptions::default() };
    let run = block_on(runner.copy(&mut plan, options, None)).unwrap();
    let copied = kcopyd_tool::report::copy_report(&plan, &run, false, 143);
    assert_eq!((copied.command, copied.status, copied.exit_code), ("copy", "ok", 0));
    assert_eq!((copied.bytes_copied, copied.bytes_not_copied), (Some(1 << 20), Some(0)));
    assert_eq!(copied.targets[0].status, "ok");
    assert!(copied.verify.as_ref().is_some_and(|v| v.identical && v.bytes_verified == 1 << 20));
    // Zero 8 sectors of the target: verify reports them in the target's own sectors.
    let zero = plan_zero(&[address("t", &target, (1 << 20) + 4096)], Some(4096), &settings).unwrap();
    let zeroed = block_on(runner.zero(&zero, Flags::empty())).unwrap();
    let zero_report = kcopyd_tool::report::zero_report(&zero, &zeroed, 143);
    assert_eq!((zero_report.status, zero_report.exit_code, zero_report.bytes), ("ok", 0, 4096));
    let plan = plan_with_source(&address("source", &source, 0), &addresses, None, false, &settings).unwrap();
    let compared = block_on(runner.verify(&plan)).unwrap();
    let verified = kcopyd_tool::report::verify_command_report(&plan, &compared, 143);
    assert_eq!((verified.status, verified.exit_code), ("differences", 1));
    let verify = verified.targets[0].verify.as_ref().unwrap();
    assert_eq!((verify.status, verify.first_differing_sector), ("differs", Some(2048 + 8)));
    assert_eq!(verify.differing_sectors, [[2056, 2064]]);
    // A cancelled copy reports the caller's code for it.
    cancel.cancel();
    let mut plan = plan_with_source(&address("source", &source, 0), &addresses, None, true, &settings).unwrap();
    let run = block_on(runner.copy(&mut plan, CopyOptions::default(), None)).unwrap();
    let cancelled = kcopyd_tool::report::copy_report(&plan, &run, false, 143);
    assert_eq!((cancelled.status, cancelled.exit_code, cancelled.cancelled), ("cancelled", 143, true));
}

#[test]
fn a_missing_or_empty_map_holds_nothing_to_retry_and_the_report_says_so() {
    let path = std::env::temp_dir().join(format!("kcopyd-tool-holds-nothing-{}.map", std::process::id()));
    let _ = std::fs::remove_file(&path);
    assert!(kcopyd_tool::map::holds_nothing(&path));
    std::fs::write(&path, b"").unwrap();
    assert!(kcopyd_tool::map::holds_nothing(&path));
    std::fs::write(&path, b"x").unwrap();
    assert!(!kcopyd_tool::map::holds_nothing(&path));
    std::fs::remove_file(&path).unwrap();
    let report = kcopyd_tool::report::nothing_copied();
    assert_eq!((report.status, report.exit_code, report.bytes_not_copied), ("ok", 0, Some(0)));
}

#[test]
fn nbd_servers_are_warmed_up_with_the_bytes_in_flight_at_most_a_64th_of_the_range_and_two_subjobs_at_least() {
    use kcopyd_tool::run::{WARM_UP_BYTES_MAX, warm_up_bytes};
    let mib = 1u64 << 20;
    let config = |subjob_mib: usize, in_flight: usize, budget_mib: usize| ClientConfig {
        subjob_size_bytes: subjob_mib << 20,
        subjobs_in_flight: in_flight,
        page_budget: budget_mib << 8,
        ..ClientConfig::default()
    };
    // The worked example: 8 × 1 MiB in flight within 16 MiB of pages.
    assert_eq!(warm_up_bytes(&config(1, 8, 16), 1 << 30), 8 * mib);
    assert_eq!(warm_up_bytes(&config(1, 8, 16), 512 * mib), 8 * mib, "exactly 64 times");
    assert_eq!(warm_up_bytes(&config(1, 8, 16), 512 * mib - 512), 7 * mib, "a 64th, in whole sub-jobs");
    assert_eq!(warm_up_bytes(&config(1, 8, 16), 256 * mib), 4 * mib);
    assert_eq!(warm_up_bytes(&config(1, 8, 16), 128 * mib), 2 * mib, "two sub-jobs");
    assert_eq!(warm_up_bytes(&config(1, 8, 16), 128 * mib - 512), 0, "less than two sub-jobs");
    assert_eq!(warm_up_bytes(&config(1, 8, 16), 100 * mib), 0);
    assert_eq!(warm_up_bytes(&config(1, 8, 16), 0), 0);
    // Never a single sub-job: a read no larger than the requests after it lifts nothing.
    assert_eq!(warm_up_bytes(&config(2, 1, 16), 1 << 30), 0);
    assert_eq!(warm_up_bytes(&config(2, 2, 16), 1 << 30), 4 * mib);
    // Within the page budget and the cap.
    assert_eq!(warm_up_bytes(&config(1, 8, 4), 1 << 30), 4 * mib);
    assert_eq!(warm_up_bytes(&config(1, 8, 1), 1 << 30), 0, "the budget holds one sub-job");
    assert_eq!(warm_up_bytes(&config(2, 8, 16), 1 << 30), WARM_UP_BYTES_MAX, "the NBD defaults");
    assert_eq!(warm_up_bytes(&config(8, 64, 1024), 1 << 40), WARM_UP_BYTES_MAX);
    assert_eq!(warm_up_bytes(&config(64, usize::MAX, usize::MAX >> 8), u64::MAX), 0, "64 MiB sub-jobs: past the cap");
}

/// Hooks that note the thread each write is issued on.
#[derive(Debug, Default, Clone)]
struct WriteThreads(Arc<std::sync::Mutex<Vec<Option<String>>>>);

impl kcopyd_core::Hooks for WriteThreads {
    fn write<'a>(
        &'a self,
        inner: &'a dyn kcopyd_core::BlockDevice,
        offset_sectors: u64,
        buf: kcopyd_core::WriteBuf,
    ) -> kcopyd_core::IoFuture<'a, std::io::Result<()>> {
        self.0.lock().unwrap().push(std::thread::current().name().map(str::to_owned));
        inner.write(offset_sectors, buf)
    }
}

/// An export of kcopyd's own NBD server on a unix socket, on a thread of its own: stopped,
/// and its socket removed, when dropped.
struct Served {
    uri: String,
    path: std::path::PathBuf,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(name: &str, disk: Arc<MemDisk>) -> Served {
    let path = std::env::temp_dir().join(format!("kcopyd-runner-{}-{name}.sock", std::process::id()));
    let address = kcopyd_nbd::Address::Unix(path.clone());
    let server = kcopyd_nbd::NbdServer::bind(&address, disk, kcopyd_nbd::ServerOptions::default()).unwrap();
    let uri = server.uri().to_owned();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        block_on(server.serve(async move {
            let _ = stopped.await;
        }))
    });
    Served { uri, path, _stop: stop }
}

/// A copy from an NBD export runs its engine on the thread of the reactor that serves the
/// export, so that requests and replies never wake another thread; a copy without one runs it
/// on a worker thread of its own. Both copy every byte.
#[test]
fn a_copy_from_an_nbd_export_runs_its_engine_on_the_reactors_thread() {
    let settings = Settings::new(ClientConfig { page_budget: 64, ..ClientConfig::default() });
    let source = Arc::new(MemDisk::with_pattern("source", 4096, 512, 11));
    let served = serve("source", source.clone());
    let cancel = Cancel::new();
    let runner = Runner { settings: &settings, on_event: &|_| {}, cancel: &cancel };
    let copy = |from: DeviceAddress| {
        let hooks = WriteThreads::default();
        let target = Arc::new(MemDisk::zeroed("target", 4096, 512));
        let watched: Device = Arc::new(kcopyd_core::Forward::new(target.clone(), hooks.clone()));
        let target_address =
            DeviceAddress { text: "target".into(), backend: Backend::Sim(Arc::new(Made(watched))), offset_bytes: 0 };
        let mut plan = plan_with_source(&from, &[target_address], None, true, &settings).unwrap();
        let reactor = kcopyd_tool::run::nbd_reactor(plan.devices());
        let run = block_on(runner.copy(&mut plan, CopyOptions::default(), None)).unwrap();
        assert!(kcopyd_tool::run::job_ok(&run.job.outcome), "{:?}", run.job.outcome);
        assert!(target.snapshot(0, 4096) == source.snapshot(0, 4096), "every byte copied");
        let threads = std::mem::take(&mut *hooks.0.lock().unwrap());
        (reactor.map(|reactor| reactor.thread_id()), threads)
    };
    let nbd = DeviceAddress { text: served.uri.clone(), backend: Backend::Nbd(served.uri.clone()), offset_bytes: 0 };
    let (reactor, threads) = copy(nbd);
    assert!(reactor.is_some(), "the export's reactor is found");
    assert!(!threads.is_empty() && threads.iter().all(|t| t.as_deref() == Some("kcopyd-nbd")), "{threads:?}");
    let (reactor, threads) = copy(address("sim", &source, 0));
    assert!(reactor.is_none(), "no NBD export, no reactor");
    assert!(!threads.is_empty() && threads.iter().all(|t| t.as_deref() == Some("kcopyd-client")), "{threads:?}");
}

/// A file of `len` bytes at `path`, every byte `byte`.
fn file_of(path: &std::path::Path, len: usize, byte: u8) {
    std::fs::write(path, vec![byte; len]).unwrap();
}

/// What happens to a target's path (the target, another file) while a command runs.
type PathHappening = fn(&std::path::Path, &std::path::Path);

fn path_address(path: &std::path::Path) -> DeviceAddress {
    DeviceAddress { text: path.display().to_string(), backend: Backend::Path(path.to_path_buf()), offset_bytes: 0 }
}

#[test]
fn a_target_renamed_over_or_removed_during_the_run_is_reported_with_nothing_copied() {
    let dir = std::env::temp_dir().join(format!("kcopyd-tool-path-change-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (source, target, other) = (dir.join("source.img"), dir.join("target.img"), dir.join("other.img"));
    file_of(&source, 1 << 20, 0xa5);
    let settings = Settings::new(ClientConfig::default());
    let cancel = Cancel::new();
    // What happens to the target's path once the command has opened it: nothing, another
    // file renamed over it, or removed.
    let cases: [(&str, PathHappening); 3] = [
        ("ok", |_, _| {}),
        ("replaced", |target, other| std::fs::rename(other, target).unwrap()),
        ("removed", |target, _| std::fs::remove_file(target).unwrap()),
    ];
    for (expected, change) in cases {
        file_of(&target, 1 << 20, 0);
        file_of(&other, 1 << 20, 0);
        // Once, when the first phase starts (the copy's or the zeroing's, not the read-back's).
        let changed = std::cell::Cell::new(false);
        let on_event = |event: Event<'_>| {
            if let Event::Started { .. } = event
                && !changed.replace(true)
            {
                change(&target, &other);
            }
        };
        let runner = Runner { settings: &settings, on_event: &on_event, cancel: &cancel };
        let mut plan =
            plan_with_source(&path_address(&source), &[path_address(&target)], None, true, &settings).unwrap();
        let options = CopyOptions { verify: true, ..CopyOptions::default() };
        let run = block_on(runner.copy(&mut plan, options, None)).unwrap();
        let report = kcopyd_tool::report::copy_report(&plan, &run, false, 143);
        // The writes themselves went well, to the file opened at the start: read back identical.
        assert!(run.job.outcome.targets[0].write_failed.is_empty(), "{expected}");
        assert!(report.verify.as_ref().is_some_and(|v| v.identical), "{expected}");
        assert_eq!(report.targets[0].status, expected);
        if expected == "ok" {
            assert_eq!((report.status, report.exit_code, report.bytes_not_copied), ("ok", 0, Some(0)));
            assert!(report.targets[0].path_change.is_none());
            assert_eq!(std::fs::read(&target).unwrap(), vec![0xa5; 1 << 20]);
            continue;
        }
        // The path does not hold the copy, so the command does not say it does.
        assert_eq!((report.status, report.exit_code), ("errors", 1), "{expected}");
        assert_eq!((report.bytes_copied, report.bytes_not_copied), (Some(0), Some(1 << 20)), "{expected}");
        assert_eq!(report.targets[0].bytes_not_copied, Some(1 << 20));
        let change = report.targets[0].path_change.as_deref().unwrap();
        assert!(change.contains("what was written is not there"), "{change}");
        let summary = kcopyd_tool::summary::human(&report, "");
        assert!(summary.contains(&format!("{}: {expected}: the path", target.display())), "{summary}");
        if expected == "replaced" {
            assert_eq!(std::fs::read(&target).unwrap(), vec![0; 1 << 20], "the file now at the path is untouched");
        }
        // Comparing: the same question; what was compared is not what the path names now.
        file_of(&target, 1 << 20, 0xa5);
        file_of(&other, 1 << 20, 0xa5);
        changed.set(false);
        let compare = plan_with_source(&path_address(&source), &[path_address(&target)], None, false, &settings);
        let compare = compare.unwrap();
        let compared = block_on(runner.verify(&compare)).unwrap();
        assert!(compared.comparison.identical(), "the file opened matched: {expected}");
        let verify_report = kcopyd_tool::report::verify_command_report(&compare, &compared, 143);
        assert_eq!((verify_report.status, verify_report.exit_code), ("errors", 1), "{expected}");
        assert_eq!(verify_report.targets[0].status, expected);
        let summary = kcopyd_tool::summary::human(&verify_report, "");
        assert!(summary.contains("what was compared is not what the path names now"), "{summary}");
        drop(compare);
        // Zeroing: the same question, the same answer.
        file_of(&target, 1 << 20, 7);
        file_of(&other, 1 << 20, 7);
        changed.set(false);
        let zero = plan_zero(&[path_address(&target)], None, &settings).unwrap();
        let zeroed = block_on(runner.zero(&zero, Flags::empty())).unwrap();
        let zero_report = kcopyd_tool::report::zero_report(&zero, &zeroed, 143);
        assert_eq!((zero_report.status, zero_report.exit_code), ("errors", 1), "{expected}");
        assert_eq!(zero_report.targets[0].status, expected);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_created_target_or_map_given_up_is_removed_only_while_its_path_still_names_it() {
    let dir = std::env::temp_dir().join(format!("kcopyd-tool-created-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (source, target, other, map) =
        (dir.join("source.img"), dir.join("target.img"), dir.join("other.img"), dir.join("copy.map"));
    file_of(&source, 64 << 10, 0xa5);
    let settings = Settings::new(ClientConfig::default());
    let plan = |settings: &Settings| {
        plan_with_source(&path_address(&source), &[path_address(&target)], None, true, settings).unwrap()
    };
    // Given up before any write (dropped without being kept): the target it created goes.
    drop(plan(&settings));
    assert!(!target.exists(), "a created target given up is removed");
    // Another file renamed over the created target's name meanwhile is someone else's: it stays.
    let made = plan(&settings);
    file_of(&other, 4096, 7);
    std::fs::rename(&other, &target).unwrap();
    drop(made);
    assert_eq!(std::fs::read(&target).unwrap(), vec![7; 4096], "the file renamed over it is left alone");
    std::fs::remove_file(&target).unwrap();
    // The same for a copy map the run created.
    let made = plan(&settings);
    let (copy_map, _) = kcopyd_tool::map::open_for(&map, &made, 1 << 20).unwrap();
    drop(copy_map);
    assert!(!map.exists(), "a created map given up is removed");
    let (copy_map, _) = kcopyd_tool::map::open_for(&map, &made, 1 << 20).unwrap();
    file_of(&other, 4096, 9);
    std::fs::rename(&other, &map).unwrap();
    drop(copy_map);
    assert_eq!(std::fs::read(&map).unwrap(), vec![9; 4096], "the file renamed over the map is left alone");
    drop(made);
    std::fs::remove_dir_all(&dir).unwrap();
}
