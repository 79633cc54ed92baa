//! The copy map (`copy --map FILE`): which ranges of a copy are done, failed to read or failed
//! to write, so that an interrupted or failed copy resumes where it stopped.
//!
//! ```text
//!  kcopyd-map 1                  ← format and version
//!  source 0 disk.img             ← offset in bytes, then the argument as given
//!  target 0 backup.img           ← one line per target, in order
//!  length 8589934592             ← bytes of the copy (the range every line refers to)
//!  done 0 131072                 ← sectors [start, end) of the range, relative to its start
//!  read-failed 131072 131080
//!  write-failed 0 131080 131088  ← target index, then sectors
//! ```
//!
//! The copy runs in batches of `--map-batch` bytes, one engine job each. After a batch, the
//! targets are flushed, then its lines are appended and the map fsynced: a line is written only
//! for data already durable on every target, and a crash (even SIGKILL between the flush and
//! the append) redoes at most the batch in flight. The file is only ever appended to; a last
//! line without its newline (a crash during the append) is ignored, and cut off when the copy
//! resumes. Later lines win: a range read-failed and later done is done.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use futures_util::future::join_all;
use kcopyd_core::{Device, Flags, Job, Outcome, RangeSet, Region, SECTOR_SIZE, Sparse};

use crate::error::CliError;

/// The first line of every map.
pub const MAGIC: &str = "kcopyd-map 1";
/// Bytes per batch (one engine job, one flush and one fsync of the map) by default.
pub const BATCH_DEFAULT: &str = "256M";

/// What a map is for: the copy's devices and range, as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapHeader {
    /// The source: offset in bytes and the argument's text.
    pub source: (u64, String),
    /// The targets, in order.
    pub targets: Vec<(u64, String)>,
    /// Bytes of the copy.
    pub len_bytes: u64,
}

impl MapHeader {
    fn render(&self) -> String {
        let mut text = format!("{MAGIC}\nsource {} {}\n", self.source.0, self.source.1);
        for (offset, name) in &self.targets {
            text += &format!("target {offset} {name}\n");
        }
        text + &format!("length {}\n", self.len_bytes)
    }
}

/// What the map's records say, in sectors relative to the start of the copy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapState {
    /// Copied to every target and flushed.
    pub done: RangeSet,
    /// The source could not be read.
    pub read_failed: RangeSet,
    /// Some target could not be written (per target index).
    pub write_failed: Vec<RangeSet>,
}

impl MapState {
    /// Every failed sector (read or write).
    pub fn failed(&self) -> RangeSet {
        let mut failed = self.read_failed.clone();
        for set in &self.write_failed {
            failed.extend(set);
        }
        failed
    }

    /// Sectors of `0..len_sectors` neither done nor failed.
    pub fn remaining(&self, len_sectors: u64) -> RangeSet {
        RangeSet::from_range(0..len_sectors).difference(&self.done).difference(&self.failed())
    }

    fn apply_done(&mut self, range: Range<u64>) {
        let set = RangeSet::from_range(range.clone());
        self.read_failed = self.read_failed.difference(&set);
        for failed in &mut self.write_failed {
            *failed = failed.difference(&set);
        }
        self.done.insert(range);
    }
}

/// Parses a map: its header and its records. A last line without a newline is ignored.
///
/// # Errors
/// Not a map, or a line that cannot be read (its number and text).
pub fn parse(text: &str) -> Result<(MapHeader, MapState), String> {
    let complete = match text.rfind('\n') {
        Some(end) => &text[..=end],
        None => "",
    };
    let mut lines = complete.lines().enumerate();
    let bad = |number: usize, line: &str| format!("line {}: cannot read {line:?}", number + 1);
    match lines.next() {
        Some((_, line)) if line == MAGIC => {}
        _ => return Err(format!("not a kcopyd map (the first line is not {MAGIC:?})")),
    }
    let mut source = None;
    let mut targets = Vec::new();
    let mut len_bytes = None;
    let mut state = MapState::default();
    for (number, line) in lines {
        let (word, rest) = line.split_once(' ').ok_or_else(|| bad(number, line))?;
        let numbers = |count: usize| -> Result<Vec<u64>, String> {
            let values: Vec<u64> =
                rest.split(' ').map(str::parse).collect::<Result<_, _>>().map_err(|_| bad(number, line))?;
            if values.len() == count { Ok(values) } else { Err(bad(number, line)) }
        };
        let range = |start: u64, end: u64| if start < end { Ok(start..end) } else { Err(bad(number, line)) };
        match word {
            "source" | "target" if len_bytes.is_none() => {
                let (offset, name) = rest.split_once(' ').ok_or_else(|| bad(number, line))?;
                let offset = offset.parse().map_err(|_| bad(number, line))?;
                if word == "source" && source.is_none() {
                    source = Some((offset, name.to_owned()));
                } else if word == "target" && source.is_some() {
                    targets.push((offset, name.to_owned()));
                } else {
                    return Err(bad(number, line));
                }
            }
            "length" if len_bytes.is_none() && !targets.is_empty() => {
                len_bytes = Some(numbers(1)?[0]);
                state.write_failed = vec![RangeSet::new(); targets.len()];
            }
            "done" if len_bytes.is_some() => {
                let v = numbers(2)?;
                state.apply_done(range(v[0], v[1])?);
            }
            "read-failed" if len_bytes.is_some() => {
                let v = numbers(2)?;
                let r = range(v[0], v[1])?;
                state.done = state.done.difference(&RangeSet::from_range(r.clone()));
                state.read_failed.insert(r);
            }
            "write-failed" if len_bytes.is_some() => {
                let v = numbers(3)?;
                let r = range(v[1], v[2])?;
                let failed = state.write_failed.get_mut(v[0] as usize).ok_or_else(|| bad(number, line))?;
                failed.insert(r.clone());
                state.done = state.done.difference(&RangeSet::from_range(r));
            }
            _ => return Err(bad(number, line)),
        }
    }
    match (source, len_bytes) {
        (Some(source), Some(len_bytes)) => Ok((MapHeader { source, targets, len_bytes }, state)),
        _ => Err("the header is incomplete (source, targets, length)".into()),
    }
}

/// An open map, appended to after every batch.
#[derive(Debug)]
pub struct CopyMap {
    path: PathBuf,
    file: File,
    /// What the map says so far.
    pub state: MapState,
}

impl CopyMap {
    /// Opens the map at `path` for the copy `header`, or creates it (durably) if it is missing
    /// or empty.
    ///
    /// # Errors
    /// The map is for another copy, cannot be read, or cannot be created (exit 2: nothing
    /// was written to any target).
    pub fn open(path: &Path, header: &MapHeader) -> Result<CopyMap, CliError> {
        let error = |problem: String| CliError::argument("--map", path.display().to_string(), problem);
        let existing = match std::fs::read(path) {
            Ok(bytes) if !bytes.is_empty() => Some(bytes),
            Ok(_) => None,
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(error(format!("cannot read it ({e})"))),
        };
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .map_err(|e| error(format!("cannot open it for appending ({e})")))?;
        let state = match existing {
            Some(bytes) => {
                let text = String::from_utf8(bytes).map_err(|_| error("not a kcopyd map (not text)".into()))?;
                let (found, state) = parse(&text).map_err(error)?;
                if &found != header {
                    return Err(error(format!(
                        "the map is for another copy ({}); this copy is {}",
                        describe(&found),
                        describe(header)
                    )));
                }
                if !text.ends_with('\n') {
                    // A torn last line (a crash during an append): cut it off, so that the next
                    // record starts a line of its own. Nothing before it changes.
                    let whole = text.rfind('\n').map_or(0, |end| end + 1) as u64;
                    file.set_len(whole).and_then(|()| file.sync_data()).map_err(|e| error(e.to_string()))?;
                }
                state
            }
            None => {
                let mut writer = &file;
                writer
                    .write_all(header.render().as_bytes())
                    .and_then(|()| file.sync_all())
                    .and_then(|()| sync_parent(path))
                    .map_err(|e| error(format!("cannot write it ({e})")))?;
                MapState { write_failed: vec![RangeSet::new(); header.targets.len()], ..MapState::default() }
            }
        };
        Ok(CopyMap { path: path.to_path_buf(), file, state })
    }

    /// Appends what the batch `batch` (relative sectors) came to, and fsyncs. `outcome` is the
    /// batch job's outcome, its ranges in device coordinates; `source_start` and
    /// `target_starts` the devices' first sectors of the copy.
    ///
    /// # Errors
    /// The map cannot be written.
    pub fn record(
        &mut self,
        batch: Range<u64>,
        outcome: &Outcome,
        source_start: u64,
        target_starts: &[u64],
    ) -> Result<(), CliError> {
        let mut text = String::new();
        const INSIDE: &str = "an outcome's ranges lie inside the batch's regions";
        let read_failed = outcome.read_failed.shifted(source_start, 0).expect(INSIDE);
        let mut not_done = read_failed.clone();
        let mut write_failed = Vec::new();
        for ((index, report), &start) in outcome.targets.iter().enumerate().zip(target_starts) {
            not_done.extend(&report.not_copied.shifted(start, 0).expect(INSIDE));
            write_failed.push((index, report.write_failed.shifted(start, 0).expect(INSIDE)));
        }
        let done = RangeSet::from_range(batch).difference(&not_done);
        for range in done.ranges() {
            text += &format!("done {} {}\n", range.start, range.end);
            self.state.apply_done(range.clone());
        }
        for range in read_failed.ranges() {
            text += &format!("read-failed {} {}\n", range.start, range.end);
            self.state.read_failed.insert(range.clone());
        }
        for (index, set) in write_failed {
            for range in set.ranges() {
                text += &format!("write-failed {index} {} {}\n", range.start, range.end);
                self.state.write_failed[index].insert(range.clone());
            }
        }
        if text.is_empty() {
            return Ok(());
        }
        let mut file = &self.file;
        file.write_all(text.as_bytes()).and_then(|()| file.sync_data()).map_err(|source| CliError::Io {
            operation: "appending to the map",
            path: self.path.display().to_string(),
            source,
        })
    }
}

/// The batches of `work` (relative sectors), in order, each at most `batch_sectors` long.
pub fn batches(work: &RangeSet, batch_sectors: u64) -> impl Iterator<Item = Range<u64>> + '_ {
    assert!(batch_sectors > 0);
    work.ranges().iter().flat_map(move |piece| {
        (piece.start..piece.end).step_by(batch_sectors as usize).map(move |at| at..(at + batch_sectors).min(piece.end))
    })
}

/// The job of one batch (relative sectors) from `source` to `targets`, each a device and the
/// first sector of the copy on it.
pub fn batch_job(
    batch: &Range<u64>,
    source: (&Device, u64),
    targets: &[(Device, u64)],
    flags: Flags,
    sparse: Sparse,
) -> Job {
    let len = batch.end - batch.start;
    Job::copy(
        Region::new(source.0.clone(), source.1 + batch.start, len),
        targets.iter().map(|(device, start)| Region::new(device.clone(), start + batch.start, len)).collect(),
        flags,
    )
    .sparse(sparse)
}

/// After a batch's job: flushes every target, then, if every flush succeeded, records the
/// batch in the map (so that what the map calls done is durable). Returns each target's flush
/// error.
///
/// # Errors
/// The map cannot be written.
pub async fn finish_batch(
    map: &mut CopyMap,
    batch: Range<u64>,
    outcome: &Outcome,
    source_start: u64,
    targets: &[(Device, u64)],
) -> Result<Vec<Option<io::Error>>, CliError> {
    let flushes = join_all(targets.iter().map(|(device, _)| device.flush())).await;
    let errors: Vec<Option<io::Error>> = flushes.into_iter().map(Result::err).collect();
    if errors.iter().all(Option::is_none) {
        let starts: Vec<u64> = targets.iter().map(|(_, start)| *start).collect();
        map.record(batch, outcome, source_start, &starts)?;
    }
    Ok(errors)
}

fn describe(header: &MapHeader) -> String {
    let targets: Vec<String> = header.targets.iter().map(|(o, n)| format!("{n} at {o}")).collect();
    format!("{} at {} to {}, {} bytes", header.source.1, header.source.0, targets.join(", "), header.len_bytes)
}

/// Makes a new file's directory entry durable.
fn sync_parent(path: &Path) -> io::Result<()> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(parent)?.sync_all()
}

/// Bytes in `set` (sectors).
fn bytes(set: &RangeSet) -> u64 {
    set.len_sectors() * SECTOR_SIZE as u64
}

fn ranges_line(set: &RangeSet) -> String {
    const SHOWN: usize = 8;
    let mut parts: Vec<String> = set
        .ranges()
        .iter()
        .take(SHOWN)
        .map(|r| format!("{}..{}", r.start * SECTOR_SIZE as u64, r.end * SECTOR_SIZE as u64))
        .collect();
    if set.ranges().len() > SHOWN {
        parts.push(format!("and {} more", set.ranges().len() - SHOWN));
    }
    parts.join(" ")
}

/// `kcopyd map show FILE`: the map's copy, then done / failed / remaining by byte ranges
/// (relative to the start of the copy).
///
/// # Errors
/// The file cannot be read or is not a map.
pub fn show(path: &Path) -> Result<String, CliError> {
    let error = |problem: String| CliError::argument("FILE", path.display().to_string(), problem);
    let raw = std::fs::read(path).map_err(|e| error(format!("cannot read it ({e})")))?;
    let text = String::from_utf8(raw).map_err(|_| error("not a kcopyd map (not text)".into()))?;
    let (header, state) = parse(&text).map_err(error)?;
    let len_sectors = header.len_bytes / SECTOR_SIZE as u64;
    let mut out = format!("map {}: {}\n", path.display(), describe(&header));
    let mut line = |label: &str, set: &RangeSet| {
        let text =
            format!("  {label:<13} {:>15} bytes in {:>6} ranges  {}", bytes(set), set.ranges().len(), ranges_line(set));
        out += text.trim_end();
        out.push('\n');
    };
    line("done", &state.done);
    line("read failed", &state.read_failed);
    let mut write_failed = RangeSet::new();
    for set in &state.write_failed {
        write_failed.extend(set);
    }
    line("write failed", &write_failed);
    line("remaining", &state.remaining(len_sectors));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> MapHeader {
        MapHeader { source: (0, "a b.img".into()), targets: vec![(4096, "t.img".into())], len_bytes: 1 << 20 }
    }

    #[test]
    fn records_replay_later_lines_winning_and_a_torn_last_line_is_ignored() {
        let mut text = header().render();
        text += "done 0 100\nread-failed 100 108\nwrite-failed 0 200 208\ndone 100 104\ndone 300 30";
        let (found, state) = parse(&text).unwrap();
        assert_eq!(found, header());
        assert_eq!(state.done, RangeSet::from_range(0..104));
        assert_eq!(state.read_failed, RangeSet::from_range(104..108));
        assert_eq!(state.write_failed[0], RangeSet::from_range(200..208));
        assert_eq!(state.remaining(2048).ranges(), &[108..200, 208..2048]);
    }

    /// A copy in batches whose target crashes (its volatile cache lost) at `crash_ms` of
    /// virtual time, then resumed from the map as a new run would: returns nothing, asserts.
    fn crash_and_resume(crash_ms: u64) {
        use std::sync::Arc;
        use std::time::Duration;

        use kcopyd_core::{BlockDevice, ClientConfig};
        use kcopyd_sim::{FaultPlan, IoModel, Latency, MemDisk, MemDiskOptions, Simulation, to_tokio};

        const LEN_SECTORS: u64 = 32 * 1024; // 16 MiB
        const BATCH_SECTORS: u64 = 4096; // 2 MiB
        let model = IoModel { cost_us: 100, bandwidth_bytes_per_s: 200_000_000, queue_depth: 4, jitter_us: 0 };
        let source = Arc::new(MemDisk::new(MemDiskOptions {
            name: "source".into(),
            len_sectors: LEN_SECTORS,
            latency: Latency { read: model, ..Latency::default() },
            ..MemDiskOptions::default()
        }));
        source.fill_pattern(5);
        let target = Arc::new(MemDisk::new(MemDiskOptions {
            name: "target".into(),
            len_sectors: LEN_SECTORS,
            latency: Latency { write: model, ..Latency::default() },
            faults: FaultPlan { volatile_cache: true, ..FaultPlan::default() },
            ..MemDiskOptions::default()
        }));
        let path = std::env::temp_dir().join(format!("kcopyd-map-crash-{}-{crash_ms}.map", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let header = MapHeader {
            source: (0, "sim:source".into()),
            targets: vec![(0, "sim:target".into())],
            len_bytes: LEN_SECTORS * 512,
        };
        let source_device: Device = source.clone();
        let targets: Vec<(Device, u64)> = vec![(target.clone(), 0)];
        let copy = |crash: Option<Duration>| {
            let mut map = CopyMap::open(&path, &header).unwrap();
            let (source_device, targets, target) = (source_device.clone(), targets.clone(), target.clone());
            Simulation::run(ClientConfig::default(), |client, _| async move {
                if let Some(crash) = crash {
                    tokio::task::spawn_local(async move {
                        tokio::time::sleep(to_tokio(crash)).await;
                        target.crash();
                    });
                }
                let work = map.state.remaining(LEN_SECTORS);
                for batch in batches(&work, BATCH_SECTORS) {
                    let job = batch_job(&batch, (&source_device, 0), &targets, Flags::empty(), Sparse::OFF);
                    let outcome = client.submit(job).await.unwrap().await;
                    let flushes = finish_batch(&mut map, batch, &outcome, 0, &targets).await.unwrap();
                    if !outcome.is_ok() || flushes.iter().any(Option::is_some) {
                        break;
                    }
                }
                map.state.clone()
            })
            .unwrap()
        };
        let crashed = copy(Some(Duration::from_millis(crash_ms)));
        target.restart();
        // What the map calls done survived the crash.
        for range in crashed.done.ranges() {
            let len = range.end - range.start;
            assert!(target.snapshot(range.start, len) == source.snapshot(range.start, len), "{crash_ms} ms: {range:?}");
        }
        // At most the batch in flight was written beyond what the map holds.
        let written = target.stats().written_bytes;
        assert!(written <= (crashed.done.len_sectors() + BATCH_SECTORS) * 512, "{crash_ms} ms: {written} written");
        let resumed = copy(None);
        assert_eq!(resumed.done, RangeSet::from_range(0..LEN_SECTORS), "{crash_ms} ms");
        let resumed_bytes = target.stats().written_bytes - written;
        assert_eq!(resumed_bytes, (LEN_SECTORS - crashed.done.len_sectors()) * 512, "only what was not done");
        assert!(target.snapshot(0, LEN_SECTORS) == source.snapshot(0, LEN_SECTORS), "{crash_ms} ms: identical");
        assert!(target.geometry().len_sectors == LEN_SECTORS);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn crashes_in_virtual_time_lose_nothing_the_map_calls_done_and_redo_at_most_a_batch() {
        // The whole copy takes about 85 ms of virtual time; crash before, during and after.
        for crash_ms in [0, 9, 23, 41, 77, 200] {
            crash_and_resume(crash_ms);
        }
    }

    #[test]
    fn bad_maps_are_refused_with_the_line() {
        assert!(parse("something else\n").unwrap_err().contains("not a kcopyd map"));
        let text = header().render() + "done 5 2\n";
        assert!(parse(&text).unwrap_err().contains("line 5"));
        let text = header().render() + "write-failed 3 0 8\n";
        assert!(parse(&text).unwrap_err().contains("line 5"), "no target 3");
        assert!(parse("kcopyd-map 1\nsource 0 x\n").unwrap_err().contains("incomplete"));
    }
}
