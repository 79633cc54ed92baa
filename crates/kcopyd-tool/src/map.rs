//! The copy map (`kcopyd copy --map FILE`): which ranges of a copy are done, failed to read or failed
//! to write, so that an interrupted or failed copy resumes where it stopped.
//!
//! ```text
//!  kcopyd-map 2                  ← format and version
//!  source 0 disk.img             ← offset in bytes, then the argument as given
//!  id file dev=2049 ino=131 size=8589934592 born=1765080000.123456789
//!  target 0 backup.img           ← one line per target, in order, each followed by its id
//!  id file dev=2049 ino=140 size=8589934592 born=1765080100.000000001
//!  length 8589934592             ← bytes of the copy (the range every line refers to)
//!  done 0 131072                 ← sectors [start, end) of the range, relative to its start
//!  read-failed 131072 131080
//!  write-failed 0 131080 131088  ← target index, then sectors
//! ```
//!
//! The copy runs in batches of at most `--map-batch` bytes: one engine job per range of the
//! batch, then one flush of the targets, then its lines are appended and the map fsynced: a
//! line is written only for data already durable on every target, and a crash (even SIGKILL
//! between the flush and the append) redoes at most the batch in flight. The file is only ever
//! appended to; a last line without its newline (a crash during the append) is ignored, and cut
//! off when the copy resumes. Later lines win: a range read-failed and later done is done.
//!
//! A map vouches only for the devices it was written for: the `id` lines (see [`identity`])
//! must match the devices opened now, else the run is refused before anything is written. The
//! map is locked (`flock`, exclusive) for the whole run, so two runs never share one.

pub mod identity;
mod intervals;
mod refusal;

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::ops::Range;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use futures_util::future::join_all;
use kcopyd_core::{Device, Flags, Job, Outcome, RangeSet, Region, SECTOR_SIZE, Sparse};
use rustix::fs::FlockOperation;
use rustix::io::Errno;
use thiserror::Error;

pub use intervals::Intervals;

use crate::error::Role;
use crate::open::Opened;
pub use refusal::{DeviceRefusal, MapRefusal};

/// The first line of every map this version writes.
pub const MAGIC: &str = "kcopyd-map 2";
/// The first line of maps written before maps recorded their devices' identities.
pub const MAGIC_UNVERIFIABLE: &str = "kcopyd-map 1";
/// Bytes per batch (one flush and one fsync of the map) by default.
pub const BATCH_DEFAULT: &str = "256M";
/// The longest line a map may hold, newline included: a header line holds a path (at most
/// 4096 bytes on Linux) or an NBD URI. A longer line is not a map's.
pub const LINE_BYTES_MAX: usize = 16 * 1024;
/// Ranges to copy that lie at most this far apart (with nothing failed between them) are
/// copied by one job, the done sectors between them copied again: many small failed ranges
/// then take few jobs, and a gap this small costs less to copy than a job of its own.
pub const GAP_MERGE_BYTES: u64 = 64 * 1024;
/// Jobs per batch at most, whatever their size: a batch of many small ranges still ends in a
/// flush and a map append every so often.
pub const JOBS_PER_BATCH_MAX: usize = 4096;

const _: () = assert!(GAP_MERGE_BYTES % SECTOR_SIZE as u64 == 0);
const _: () = assert!(LINE_BYTES_MAX > 4096 + 64, "a line holds a whole path");

/// Why a map cannot be read.
#[derive(Debug, Error)]
pub enum MapError {
    /// Reading the file failed.
    #[error("cannot read it: {0}")]
    Read(#[source] io::Error),
    /// The first line is not a map's.
    #[error("not a kcopyd map (the first line is not {MAGIC:?})")]
    NotAMap,
    /// A map of the first version, which records no identities.
    #[error(
        "a {MAGIC_UNVERIFIABLE:?} map records no identity of its devices, so it cannot show that they are \
         the ones it was written for; delete it to start over"
    )]
    Unverifiable,
    /// A line longer than [`LINE_BYTES_MAX`].
    #[error("line {line}: longer than {LINE_BYTES_MAX} bytes: not a kcopyd map")]
    LineTooLong {
        /// The line's number (from 1).
        line: u64,
    },
    /// A line that is not UTF-8.
    #[error("line {line}: not text: not a kcopyd map")]
    NotText {
        /// The line's number (from 1).
        line: u64,
    },
    /// A line that is not a record, or out of place.
    #[error("line {line}: cannot read {text:?}")]
    BadLine {
        /// The line's number (from 1).
        line: u64,
        /// The line.
        text: String,
    },
    /// A record whose range is empty, reversed or runs past the copy's end.
    #[error("line {line}: {text:?}: not a range of the copy's sectors 0..{len_sectors} (start below end)")]
    OutsideCopy {
        /// The line's number (from 1).
        line: u64,
        /// The line.
        text: String,
        /// Sectors in the copy.
        len_sectors: u64,
    },
    /// A `write-failed` record naming a target the map does not have.
    #[error("line {line}: {text:?}: the map has {count} target(s), numbered from 0")]
    NoTarget {
        /// The line's number (from 1).
        line: u64,
        /// The line.
        text: String,
        /// Targets in the map.
        count: usize,
    },
    /// The file ends before its header does.
    #[error("the header is incomplete (source, targets with their ids, length)")]
    Incomplete,
}

/// Why a map cannot be used for a copy, or could not be written: nothing was written to any
/// target when it is refused.
#[derive(Debug, Error)]
pub enum MapFileError {
    /// A device of the copy cannot be recorded in a map or identified.
    #[error("{role} '{text}': {problem}")]
    Device {
        /// Which end of the copy.
        role: Role,
        /// The address as given (escaped if it holds a newline).
        text: String,
        /// What is wrong.
        problem: DeviceRefusal,
    },
    /// The map is busy, a device of the copy, read-only, not a map, for another copy or for
    /// other devices, or cannot be created.
    #[error("map '{}': {problem}", path.display())]
    Refused {
        /// The map file.
        path: PathBuf,
        /// What is wrong.
        problem: MapRefusal,
    },
    /// A batch smaller than one logical block of the copy's devices.
    #[error("a batch of {batch_bytes} bytes is smaller than one {block_bytes}-byte logical block")]
    BatchTooSmall {
        /// The batch asked for.
        batch_bytes: u64,
        /// The largest logical block of the devices.
        block_bytes: u64,
    },
    /// Appending a batch's records failed.
    #[error("appending to the map '{}': {source}", path.display())]
    Append {
        /// The map file.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
}

/// One device of a map's copy: where the copy starts on it, its argument, its identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapDevice {
    /// Where the copy starts on the device, in bytes.
    pub offset_bytes: u64,
    /// The argument as given.
    pub name: String,
    /// What identifies the device (see [`identity`]).
    pub id: String,
}

/// What a map is for: the copy's devices and range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapHeader {
    /// The source.
    pub source: MapDevice,
    /// The targets, in order.
    pub targets: Vec<MapDevice>,
    /// Bytes of the copy.
    pub len_bytes: u64,
}

impl MapHeader {
    fn render(&self) -> String {
        let mut text = format!("{MAGIC}\n");
        for (word, device) in
            std::iter::once(("source", &self.source)).chain(self.targets.iter().map(|t| ("target", t)))
        {
            text += &format!("{word} {} {}\nid {}\n", device.offset_bytes, device.name, device.id);
        }
        text + &format!("length {}\n", self.len_bytes)
    }

    /// Whether `other` is the same copy (arguments, offsets, length), identities aside.
    fn same_copy(&self, other: &MapHeader) -> bool {
        let key = |d: &MapDevice| (d.offset_bytes, d.name.clone());
        self.len_bytes == other.len_bytes
            && key(&self.source) == key(&other.source)
            && self.targets.iter().map(key).eq(other.targets.iter().map(key))
    }

    /// Sectors the records may name: `0..len_sectors`.
    pub fn len_sectors(&self) -> u64 {
        self.len_bytes / SECTOR_SIZE as u64
    }
}

/// What the map's records say, in sectors relative to the start of the copy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapState {
    /// Copied to every target and flushed.
    pub done: Intervals,
    /// The source could not be read.
    pub read_failed: Intervals,
    /// Some target could not be written (per target index).
    pub write_failed: Vec<Intervals>,
}

impl MapState {
    fn new(targets: usize) -> MapState {
        MapState { write_failed: vec![Intervals::default(); targets], ..MapState::default() }
    }

    /// Every failed sector (read or write).
    pub fn failed(&self) -> RangeSet {
        union(std::iter::once(&self.read_failed).chain(&self.write_failed))
    }

    /// Every write-failed sector, whichever target.
    pub fn write_failed_any(&self) -> RangeSet {
        union(self.write_failed.iter())
    }

    /// Sectors of `0..len_sectors` neither done nor failed, in order.
    pub fn remaining(&self, len_sectors: u64) -> RangeSet {
        let covered = union([&self.done, &self.read_failed].into_iter().chain(&self.write_failed));
        complement(&covered, len_sectors).collect()
    }

    fn apply_done(&mut self, range: Range<u64>) {
        self.read_failed.remove(range.clone());
        for failed in &mut self.write_failed {
            failed.remove(range.clone());
        }
        self.done.insert(range);
    }

    fn apply_read_failed(&mut self, range: Range<u64>) {
        self.done.remove(range.clone());
        self.read_failed.insert(range);
    }

    fn apply_write_failed(&mut self, index: usize, range: Range<u64>) {
        self.done.remove(range.clone());
        self.write_failed[index].insert(range);
    }
}

/// The union of `sets`: their ranges gathered, sorted (runs already in order sort in linear
/// time) and merged, without a B-tree insert per range.
pub fn union<'a>(sets: impl Iterator<Item = &'a Intervals>) -> RangeSet {
    let mut all: Vec<Range<u64>> = Vec::new();
    for set in sets {
        all.extend(set.iter());
    }
    all.sort_by_key(|range| range.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(all.len());
    for range in all {
        match merged.last_mut() {
            Some(last) if range.start <= last.end => last.end = last.end.max(range.end),
            _ => merged.push(range),
        }
    }
    merged.into_iter().collect()
}

/// The ranges of `0..len_sectors` not in `set`, in order.
pub fn complement(set: &RangeSet, len_sectors: u64) -> impl Iterator<Item = Range<u64>> + '_ {
    let mut at = 0;
    set.ranges().iter().map(Some).chain(std::iter::once(None)).filter_map(move |next| {
        let (start, end) = match next {
            Some(range) => (range.start.min(len_sectors), range.end.min(len_sectors)),
            None => (len_sectors, len_sectors),
        };
        let gap = (at < start).then_some(at..start);
        at = at.max(end);
        gap
    })
}

/// A map read line by line, each line at most [`LINE_BYTES_MAX`] bytes: a file that is not a
/// map is refused after its first line, however large it is.
#[derive(Debug)]
pub struct MapLines<R> {
    reader: R,
    buf: Vec<u8>,
    number: u64,
    /// Bytes of the complete lines read so far.
    complete_bytes: u64,
    /// The file ended in a line without its newline (ignored).
    torn: bool,
}

impl<R: BufRead> MapLines<R> {
    /// Lines of `reader`.
    pub fn new(reader: R) -> MapLines<R> {
        MapLines { reader, buf: Vec::new(), number: 0, complete_bytes: 0, torn: false }
    }

    /// The next complete line (without its newline) and its number, or `None` at the end (a
    /// last line without a newline is left out, and noted in `torn`).
    ///
    /// # Errors
    /// Reading failed, or a line is too long or not text.
    pub fn next_line(&mut self) -> Result<Option<(u64, &str)>, MapError> {
        self.buf.clear();
        let limit = LINE_BYTES_MAX as u64;
        let read = (&mut self.reader).take(limit).read_until(b'\n', &mut self.buf).map_err(MapError::Read)?;
        self.number += 1;
        if self.buf.last() != Some(&b'\n') {
            if read as u64 == limit {
                return Err(if self.number == 1 {
                    MapError::NotAMap
                } else {
                    MapError::LineTooLong { line: self.number }
                });
            }
            self.torn = read > 0;
            return Ok(None);
        }
        self.complete_bytes += read as u64;
        let line = &self.buf[..self.buf.len() - 1];
        match std::str::from_utf8(line) {
            Ok(text) => Ok(Some((self.number, text))),
            Err(_) if self.number == 1 => Err(MapError::NotAMap),
            Err(_) => Err(MapError::NotText { line: self.number }),
        }
    }
}

/// A map being read: its header as far as it goes, then its records.
#[derive(Debug, Default)]
pub struct MapParser {
    source: Option<MapDevice>,
    targets: Vec<MapDevice>,
    /// The last device line still waits for its `id` line.
    id_pending: bool,
    len_bytes: Option<u64>,
    state: MapState,
}

impl MapParser {
    /// Takes line `number` (from 1).
    ///
    /// # Errors
    /// The line is not the map's first line, not a record, out of place or out of range.
    pub fn feed(&mut self, number: u64, line: &str) -> Result<(), MapError> {
        if number == 1 {
            return match line {
                MAGIC => Ok(()),
                MAGIC_UNVERIFIABLE => Err(MapError::Unverifiable),
                _ => Err(MapError::NotAMap),
            };
        }
        let bad = || MapError::BadLine { line: number, text: line.to_owned() };
        let (word, rest) = line.split_once(' ').ok_or_else(bad)?;
        match (word, self.len_bytes) {
            ("source" | "target" | "id" | "length", None) => self.feed_header(word, rest).ok_or_else(bad),
            ("done" | "read-failed" | "write-failed", Some(len_bytes)) => {
                self.feed_record(number, line, word, rest, len_bytes / SECTOR_SIZE as u64)
            }
            _ => Err(bad()),
        }
    }

    fn feed_header(&mut self, word: &str, rest: &str) -> Option<()> {
        let device = |rest: &str| -> Option<MapDevice> {
            let (offset, name) = rest.split_once(' ')?;
            Some(MapDevice { offset_bytes: offset.parse().ok()?, name: name.to_owned(), id: String::new() })
        };
        match word {
            "source" if self.source.is_none() => self.source = Some(device(rest)?),
            "target" if self.source.is_some() && !self.id_pending => self.targets.push(device(rest)?),
            "id" if self.id_pending => {
                let last = self.targets.last_mut().or(self.source.as_mut())?;
                last.id = rest.to_owned();
                self.id_pending = false;
                return Some(());
            }
            "length" if !self.targets.is_empty() && !self.id_pending => {
                self.len_bytes = Some(rest.parse().ok()?);
                self.state = MapState::new(self.targets.len());
                return Some(());
            }
            _ => return None,
        }
        self.id_pending = true;
        Some(())
    }

    fn feed_record(&mut self, line: u64, text: &str, word: &str, rest: &str, len_sectors: u64) -> Result<(), MapError> {
        let mut numbers = [0u64; 3];
        let count = if word == "write-failed" { 3 } else { 2 };
        let mut fields = rest.split(' ');
        for slot in &mut numbers[..count] {
            let field = fields.next().and_then(|f| f.parse().ok());
            *slot = field.ok_or_else(|| MapError::BadLine { line, text: text.to_owned() })?;
        }
        if fields.next().is_some() {
            return Err(MapError::BadLine { line, text: text.to_owned() });
        }
        let [start, end] = [numbers[count - 2], numbers[count - 1]];
        if start >= end || end > len_sectors {
            return Err(MapError::OutsideCopy { line, text: text.to_owned(), len_sectors });
        }
        match word {
            "done" => self.state.apply_done(start..end),
            "read-failed" => self.state.apply_read_failed(start..end),
            _ => {
                let count = self.targets.len();
                let index = usize::try_from(numbers[0]).ok().filter(|&i| i < count);
                let index = index.ok_or_else(|| MapError::NoTarget { line, text: text.to_owned(), count })?;
                self.state.apply_write_failed(index, start..end);
            }
        }
        Ok(())
    }

    /// The header and the state the records add up to.
    ///
    /// # Errors
    /// The header is incomplete.
    pub fn finish(self) -> Result<(MapHeader, MapState), MapError> {
        match (self.source, self.len_bytes) {
            (Some(source), Some(len_bytes)) => Ok((MapHeader { source, targets: self.targets, len_bytes }, self.state)),
            _ => Err(MapError::Incomplete),
        }
    }
}

/// Parses a whole map from `reader`. Returns the header, the state and the bytes of its
/// complete lines (a torn last line is ignored).
///
/// # Errors
/// Not a map, or a line that cannot be read (its number and text).
pub fn parse(reader: impl BufRead) -> Result<(MapHeader, MapState, u64), MapError> {
    let mut lines = MapLines::new(reader);
    let mut parser = MapParser::default();
    while let Some((number, line)) = lines.next_line()? {
        parser.feed(number, line)?;
    }
    if lines.number == 1 && !lines.torn {
        return Err(MapError::NotAMap);
    }
    let (header, state) = parser.finish()?;
    Ok((header, state, lines.complete_bytes))
}

/// What a map must be checked against besides its header: files it must not be, and targets
/// it cannot vouch for whatever their identity says.
#[derive(Debug, Default)]
pub struct MapGuard {
    /// Each source and target file: its argument name, text and (device, inode).
    pub files: Vec<(&'static str, String, (u64, u64))>,
    /// Per target: why a map's records cannot hold for it (it did not exist before this run,
    /// or it lives for one run only), or `None`.
    pub untrusted: Vec<Option<&'static str>>,
}

/// The header of the copy of `source` to `targets` (their identities read now), and what to
/// guard the map with. `created[i]` says that target `i` was created by this run.
///
/// # Errors
/// A device name holds a newline (a map line cannot record it), or a device cannot be
/// identified.
pub fn header_of(
    source: &Opened,
    targets: &[Opened],
    len_bytes: u64,
    created: &[bool],
) -> Result<(MapHeader, MapGuard), MapFileError> {
    let mut guard = MapGuard::default();
    let mut device = |opened: &Opened| -> Result<(MapDevice, bool), MapFileError> {
        let refuse =
            |problem: DeviceRefusal| MapFileError::Device { role: opened.role, text: opened.arg.text.clone(), problem };
        if opened.arg.text.contains('\n') {
            // Named escaped, so that the message stays one line.
            return Err(MapFileError::Device {
                role: opened.role,
                text: opened.arg.text.escape_debug().to_string(),
                problem: DeviceRefusal::NewlineInName,
            });
        }
        let (id, lasting) = identity::of(opened).map_err(refuse)?;
        if opened.is_file() {
            let key = opened.device.id();
            guard.files.push((opened.role.name(), opened.arg.text.clone(), (key.major, key.minor)));
        }
        let device = MapDevice { offset_bytes: opened.arg.offset_bytes, name: opened.arg.text.clone(), id };
        Ok((device, lasting))
    };
    let (source, _) = device(source)?;
    let mut mapped = Vec::with_capacity(targets.len());
    for (target, &created) in targets.iter().zip(created) {
        let (target, lasting) = device(target)?;
        mapped.push(target);
        guard.untrusted.push(match (created, lasting) {
            (true, _) => Some("did not exist before this run (it was created now)"),
            (_, false) => Some("is a simulated disk, which lives for one run only"),
            _ => None,
        });
    }
    Ok((MapHeader { source, targets: mapped, len_bytes }, guard))
}

/// Whether there is no map at `path` yet (no file, or an empty one), so that nothing of a
/// copy through it can have failed. A file that cannot be looked at is not called empty.
pub fn holds_nothing(path: &Path) -> bool {
    match std::fs::metadata(path) {
        Ok(metadata) => metadata.len() == 0,
        Err(error) => error.kind() == std::io::ErrorKind::NotFound,
    }
}

/// Opens the map at `path` for the copy of `plan` (checked against the devices it opened),
/// with the batch size in sectors: `batch_bytes` rounded down to whole logical blocks.
///
/// # Errors
/// A batch smaller than one logical block, or a map that cannot be used (see
/// [`CopyMap::open`]); a map created here is removed again.
pub fn open_for(path: &Path, plan: &crate::plan::Plan, batch_bytes: u64) -> Result<(CopyMap, u64), MapFileError> {
    let block_bytes = plan.devices().map(Opened::block_bytes).max().unwrap_or(512);
    let whole_bytes = batch_bytes / block_bytes * block_bytes;
    if whole_bytes == 0 {
        return Err(MapFileError::BatchTooSmall { batch_bytes, block_bytes });
    }
    let (header, guard) = header_of(&plan.source, &plan.targets, plan.len_bytes, &plan.created_targets)?;
    let map = CopyMap::open(path, &header, &guard)?;
    Ok((map, whole_bytes / SECTOR_SIZE as u64))
}

/// An open map, locked for the run, appended to after every batch.
#[derive(Debug)]
pub struct CopyMap {
    path: PathBuf,
    file: File,
    /// This run created the file: it is removed again unless [`CopyMap::keep`] is called.
    created: bool,
    /// What the map says so far.
    pub state: MapState,
}

impl Drop for CopyMap {
    fn drop(&mut self) {
        if self.created {
            // Still locked: no other run has it open for its own. Only while the path names
            // it: a file renamed over it since is someone else's.
            crate::open::remove_made(&self.path, &self.file);
        }
    }
}

impl CopyMap {
    /// Opens the map at `path` for the copy `header`, locked exclusively for the run, or
    /// creates it (durably) if it is missing or empty. `guard` names the files the map must
    /// not be and the targets no record can hold for.
    ///
    /// # Errors
    /// The map is busy, is a device of the copy, read-only, not a map, for another copy, or for
    /// devices that are not the ones opened now; or it cannot be created (exit 2: nothing was
    /// written to any target).
    pub fn open(path: &Path, header: &MapHeader, guard: &MapGuard) -> Result<CopyMap, MapFileError> {
        let error = |problem: MapRefusal| MapFileError::Refused { path: path.to_path_buf(), problem };
        let (file, created) = open_locked(path, guard).map_err(error)?;
        let mut map = CopyMap { path: path.to_path_buf(), file, created, state: MapState::new(header.targets.len()) };
        let len_bytes = map.file.metadata().map_err(|e| error(MapRefusal::Stat(e)))?.len();
        if len_bytes == 0 {
            let mut writer = &map.file;
            writer
                .write_all(header.render().as_bytes())
                .and_then(|()| map.file.sync_all())
                .and_then(|()| sync_parent(path))
                .map_err(|e| error(MapRefusal::Write(e)))?;
            return Ok(map);
        }
        let (found, state, complete_bytes) =
            parse(BufReader::new(&map.file)).map_err(|e| error(MapRefusal::Read(e)))?;
        check_header(&found, header, guard).map_err(error)?;
        if complete_bytes < len_bytes {
            // A torn last line (a crash during an append): cut it off, so that the next
            // record starts a line of its own. Nothing before it changes.
            map.file
                .set_len(complete_bytes)
                .and_then(|()| map.file.sync_data())
                .map_err(|e| error(MapRefusal::CutTornLine(e)))?;
        }
        map.state = state;
        Ok(map)
    }

    /// The copy has started writing: the map stays, whatever happens next.
    pub fn keep(&mut self) {
        self.created = false;
    }

    /// Appends what a batch came to, and fsyncs. `jobs` are the batch's jobs, each its range
    /// (relative sectors) and its outcome (ranges in device coordinates); `source_start` and
    /// `target_starts` the devices' first sectors of the copy.
    ///
    /// # Errors
    /// The map cannot be written.
    pub fn record(
        &mut self,
        jobs: &[(Range<u64>, Outcome)],
        source_start: u64,
        target_starts: &[u64],
    ) -> Result<(), MapFileError> {
        const INSIDE: &str = "an outcome's ranges lie inside the batch's regions";
        let mut read_failed = RangeSet::new();
        let mut not_done = RangeSet::new();
        let mut write_failed = vec![RangeSet::new(); target_starts.len()];
        for (_, outcome) in jobs {
            let read = outcome.read_failed.shifted(source_start, 0).expect(INSIDE);
            read_failed.extend(&read);
            not_done.extend(&read);
            for ((report, &start), failed) in outcome.targets.iter().zip(target_starts).zip(&mut write_failed) {
                not_done.extend(&report.not_copied.shifted(start, 0).expect(INSIDE));
                failed.extend(&report.write_failed.shifted(start, 0).expect(INSIDE));
            }
        }
        let batch: RangeSet = jobs.iter().map(|(range, _)| range.clone()).collect();
        let mut text = String::new();
        for range in batch.difference(&not_done).ranges() {
            text += &format!("done {} {}\n", range.start, range.end);
            self.state.apply_done(range.clone());
        }
        for range in read_failed.ranges() {
            text += &format!("read-failed {} {}\n", range.start, range.end);
            self.state.apply_read_failed(range.clone());
        }
        for (index, set) in write_failed.iter().enumerate() {
            for range in set.ranges() {
                text += &format!("write-failed {index} {} {}\n", range.start, range.end);
                self.state.apply_write_failed(index, range.clone());
            }
        }
        if text.is_empty() {
            return Ok(());
        }
        let mut file = &self.file;
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_data())
            .map_err(|source| MapFileError::Append { path: self.path.clone(), source })
    }
}

/// Opens (or creates) the map file and locks it; returns it and whether it was created.
fn open_locked(path: &Path, guard: &MapGuard) -> Result<(File, bool), MapRefusal> {
    let existing = match std::fs::metadata(path) {
        Ok(metadata) => Some(metadata),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(MapRefusal::Stat(e)),
    };
    if let Some(metadata) = &existing {
        if let Some(filesystem) = kcopyd_os::pseudo_filesystem_at(path) {
            return Err(MapRefusal::PseudoFile { filesystem });
        }
        check_map_file(metadata, guard)?;
    }
    let mut options = OpenOptions::new();
    options.read(true).append(true);
    let (file, created) = match existing {
        Some(_) => (options.open(path), false),
        // Another run may create it first: then it is that run's, and its lock says so.
        None => match OpenOptions::new().read(true).append(true).create_new(true).open(path) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => (options.open(path), false),
            created => (created, true),
        },
    };
    let file = file.map_err(MapRefusal::OpenAppend)?;
    // Removed again if anything below refuses, unless another run locked it first (it is
    // using it now).
    lock(&file)?;
    // Removed only while the path still names the file created: one renamed over it is
    // someone else's.
    let opened = file.metadata().map_err(MapRefusal::Stat)?;
    let id = (opened.dev(), opened.ino());
    match std::fs::metadata(path) {
        Ok(now) if (now.dev(), now.ino()) == id => Ok((file, created)),
        _ => {
            if created {
                crate::open::remove_created(path, Some(id));
            }
            Err(MapRefusal::Replaced)
        }
    }
}

/// Refuses a map file that is not a regular file, is one of the copy's files, or that nobody
/// may write.
fn check_map_file(metadata: &std::fs::Metadata, guard: &MapGuard) -> Result<(), MapRefusal> {
    if !metadata.is_file() {
        return Err(MapRefusal::NotAFile);
    }
    let key = (metadata.dev(), metadata.ino());
    if let Some((role, text, _)) = guard.files.iter().find(|(_, _, file)| *file == key) {
        return Err(MapRefusal::DeviceOfTheCopy { role, text: text.clone() });
    }
    let mode = metadata.permissions().mode();
    if mode & 0o222 == 0 {
        return Err(MapRefusal::ReadOnly { mode: mode & 0o7777 });
    }
    Ok(())
}

/// Takes the run's exclusive lock on the map.
fn lock(file: &File) -> Result<(), MapRefusal> {
    loop {
        match rustix::fs::flock(file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(()),
            Err(Errno::INTR) => continue,
            Err(Errno::WOULDBLOCK) => {
                return Err(MapRefusal::Busy);
            }
            // A filesystem without locks: nothing to keep other runs out with.
            Err(Errno::NOLCK | Errno::OPNOTSUPP | Errno::NOSYS) => return Ok(()),
            Err(error) => return Err(MapRefusal::Lock(error)),
        }
    }
}

/// Refuses a map whose header is not `expected`'s copy, or whose devices are not the ones
/// opened now.
fn check_header(found: &MapHeader, expected: &MapHeader, guard: &MapGuard) -> Result<(), MapRefusal> {
    if !found.same_copy(expected) {
        return Err(MapRefusal::OtherCopy { found: describe(found), expected: describe(expected) });
    }
    let devices = std::iter::once(("SOURCE", &found.source, &expected.source))
        .chain(found.targets.iter().zip(&expected.targets).map(|(f, e)| ("TARGET", f, e)));
    for (what, recorded, now) in devices {
        if recorded.id != now.id {
            return Err(MapRefusal::OtherDevice {
                role: what,
                name: now.name.clone(),
                recorded: recorded.id.clone(),
                now: now.id.clone(),
            });
        }
    }
    for (target, why) in expected.targets.iter().zip(&guard.untrusted) {
        if let Some(why) = why {
            return Err(MapRefusal::Untrusted { name: target.name.clone(), why });
        }
    }
    Ok(())
}

/// The batches of `work` (relative sectors), in order: each a list of ranges, one job each,
/// at most `batch_sectors` in all and at most [`JOBS_PER_BATCH_MAX`] of them. Ranges of `work`
/// at most [`GAP_MERGE_BYTES`] apart with no sector of `failed` between them are one range
/// (the gap, done already, is copied again); a range longer than `batch_sectors` is cut.
///
/// Worked example, 4-sector batches, gaps of up to 128 sectors merged: work {0..2, 10..12,
/// 400..409}, nothing failed: 0..12 (one job over the done gap 2..10) is cut into 0..4, 4..8,
/// 8..12; 400..409 into 400..404, 404..408, 408..409: six batches of one job each.
pub fn batches(work: &RangeSet, failed: &RangeSet, batch_sectors: u64) -> Vec<Vec<Range<u64>>> {
    assert!(batch_sectors > 0);
    let gap_sectors = GAP_MERGE_BYTES / SECTOR_SIZE as u64;
    let mut spans: Vec<Range<u64>> = Vec::new();
    for range in work.ranges() {
        if let Some(last) = spans.last_mut() {
            let gap = last.end..range.start;
            if gap.end - gap.start <= gap_sectors && !failed.intersects(&gap) {
                last.end = range.end;
                continue;
            }
        }
        spans.push(range.clone());
    }
    let mut batches: Vec<Vec<Range<u64>>> = Vec::new();
    let mut filled = 0u64;
    for span in spans {
        let mut at = span.start;
        while at < span.end {
            let piece = at..(at.saturating_add(batch_sectors)).min(span.end);
            at = piece.end;
            let len = piece.end - piece.start;
            match batches.last_mut() {
                Some(batch) if filled + len <= batch_sectors && batch.len() < JOBS_PER_BATCH_MAX => {
                    filled += len;
                    batch.push(piece);
                }
                _ => {
                    filled = len;
                    batches.push(vec![piece]);
                }
            }
        }
    }
    batches
}

/// The job of one range (relative sectors) from `source` to `targets`, each a device and the
/// first sector of the copy on it.
pub fn batch_job(
    range: &Range<u64>,
    source: (&Device, u64),
    targets: &[(Device, u64)],
    flags: Flags,
    sparse: Sparse,
) -> Job {
    let len = range.end - range.start;
    Job::copy(
        Region::new(source.0.clone(), source.1 + range.start, len),
        targets.iter().map(|(device, start)| Region::new(device.clone(), start + range.start, len)).collect(),
        flags,
    )
    .sparse(sparse)
}

/// After a batch's jobs: flushes every target, then, if every flush succeeded, records the
/// batch in the map (so that what the map calls done is durable). Returns each target's flush
/// error.
///
/// # Errors
/// The map cannot be written.
pub async fn finish_batch(
    map: &mut CopyMap,
    jobs: &[(Range<u64>, Outcome)],
    source_start: u64,
    targets: &[(Device, u64)],
) -> Result<Vec<Option<io::Error>>, MapFileError> {
    let flushes = join_all(targets.iter().map(|(device, _)| device.flush())).await;
    let errors: Vec<Option<io::Error>> = flushes.into_iter().map(Result::err).collect();
    if errors.iter().all(Option::is_none) {
        let starts: Vec<u64> = targets.iter().map(|(_, start)| *start).collect();
        map.record(jobs, source_start, &starts)?;
    }
    Ok(errors)
}

/// The copy a header describes, in a few words.
pub fn describe(header: &MapHeader) -> String {
    let targets: Vec<String> = header.targets.iter().map(|t| format!("{} at {}", t.name, t.offset_bytes)).collect();
    format!(
        "{} at {} to {}, {} bytes",
        header.source.name,
        header.source.offset_bytes,
        targets.join(", "),
        header.len_bytes
    )
}

/// Makes a new file's directory entry durable.
fn sync_parent(path: &Path) -> io::Result<()> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(parent)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(offset_bytes: u64, name: &str, id: &str) -> MapDevice {
        MapDevice { offset_bytes, name: name.into(), id: id.into() }
    }

    fn header() -> MapHeader {
        MapHeader {
            source: device(0, "a b.img", "file dev=1 ino=2 size=1048576 born=5.000000000"),
            targets: vec![device(4096, "t.img", "file dev=1 ino=3 size=1052672 born=6.000000000")],
            len_bytes: 1 << 20,
        }
    }

    fn parse_text(text: &str) -> Result<(MapHeader, MapState, u64), MapError> {
        parse(text.as_bytes())
    }

    #[test]
    fn refusals_are_typed_and_name_what_was_found() {
        let dir = std::env::temp_dir();
        let guard = MapGuard::default();
        let directory = std::fs::metadata(&dir).unwrap();
        assert!(matches!(check_map_file(&directory, &guard), Err(MapRefusal::NotAFile)));
        let mut other = header();
        other.len_bytes *= 2;
        let refused = check_header(&other, &header(), &guard).unwrap_err();
        assert!(matches!(&refused, MapRefusal::OtherCopy { .. }), "{refused}");
        assert!(refused.to_string().starts_with("the map is for another copy ("), "{refused}");
        let mut moved = header();
        moved.targets[0].id = "file dev=1 ino=4 size=1052672 born=7.000000000".into();
        let refused = check_header(&header(), &moved, &guard).unwrap_err();
        let MapRefusal::OtherDevice { role: "TARGET", ref name, ref recorded, .. } = refused else {
            panic!("{refused}")
        };
        assert_eq!((name.as_str(), recorded.as_str()), ("t.img", "file dev=1 ino=3 size=1052672 born=6.000000000"));
        assert!(refused.to_string().ends_with("to start over, delete the map"), "{refused}");
    }

    #[test]
    fn records_replay_later_lines_winning_and_a_torn_last_line_is_ignored() {
        let mut text = header().render();
        let whole = text.len() as u64 + 67;
        text += "done 0 100\nread-failed 100 108\nwrite-failed 0 200 208\ndone 100 104\ndone 300 30";
        let (found, state, complete_bytes) = parse_text(&text).unwrap();
        assert_eq!(found, header());
        assert_eq!(complete_bytes, whole, "the torn line is not counted");
        assert_eq!(state.done.to_range_set(), RangeSet::from_range(0..104));
        assert_eq!(state.read_failed.to_range_set(), RangeSet::from_range(104..108));
        assert_eq!(state.write_failed[0].to_range_set(), RangeSet::from_range(200..208));
        assert_eq!(state.remaining(2048).ranges(), &[108..200, 208..2048]);
    }

    #[test]
    fn random_records_replay_as_a_flat_model_of_the_later_line_winning() {
        // Per sector: done, read-failed, write-failed on target 0 / 1, as the format says.
        const LEN: u64 = 96;
        let mut header = header();
        header.len_bytes = LEN * 512;
        header.targets.push(device(0, "u.img", "file dev=1 ino=4 size=49152 born=7.000000000"));
        let mut flat = vec![[false; 4]; LEN as usize];
        let mut text = header.render();
        let mut seed = 0x1234_5678_9abc_def1u64;
        for _ in 0..3000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let (a, b) = (seed % LEN, (seed >> 8) % LEN);
            let range = a.min(b)..a.max(b) + 1;
            let kind = (seed >> 16) % 4;
            text += &match kind {
                0 => format!("done {} {}\n", range.start, range.end),
                1 => format!("read-failed {} {}\n", range.start, range.end),
                _ => format!("write-failed {} {} {}\n", kind - 2, range.start, range.end),
            };
            for sector in range {
                let state = &mut flat[sector as usize];
                if kind == 0 {
                    *state = [true, false, false, false];
                } else {
                    state[0] = false;
                    state[kind as usize] = true;
                }
            }
        }
        let (_, state, _) = parse_text(&text).unwrap();
        let sets = [&state.done, &state.read_failed, &state.write_failed[0], &state.write_failed[1]];
        for (sector, expected) in flat.iter().enumerate() {
            let found = sets.map(|set| set.iter().any(|r| r.contains(&(sector as u64))));
            assert_eq!(&found, expected, "sector {sector}");
        }
        let remaining: Vec<u64> = (0..LEN).filter(|&s| flat[s as usize].iter().all(|&b| !b)).collect();
        let found: Vec<u64> = state.remaining(LEN).ranges().iter().flat_map(|r| r.clone()).collect();
        assert_eq!(found, remaining);
    }

    #[test]
    fn bad_maps_are_refused_with_the_line() {
        let refused = |text: &str| parse_text(text).unwrap_err().to_string();
        assert!(refused("something else\n").contains("not a kcopyd map"));
        assert!(refused("").contains("not a kcopyd map"));
        assert!(refused(&(header().render() + "done 5 2\n")).contains("line 7"));
        assert!(refused(&(header().render() + "done 5 5\n")).contains("line 7"), "empty");
        assert!(refused(&(header().render() + "write-failed 3 0 8\n")).contains("line 7"), "no target 3");
        // The copy is 2048 sectors long: a record past it, or a number past 64 bits, is refused.
        let past = refused(&(header().render() + "done 0 999999999\n"));
        assert!(past.contains("line 7") && past.contains("0..2048"), "{past}");
        assert!(refused(&(header().render() + "done 0 2049\n")).contains("line 7"));
        assert!(parse_text(&(header().render() + "done 0 2048\n")).is_ok());
        assert!(refused(&(header().render() + "done 0 18446744073709551616\n")).contains("line 7"));
        assert!(refused(&(header().render() + "read-failed 0 8 9\n")).contains("line 7"));
        assert!(refused("kcopyd-map 2\nsource 0 x\n").contains("incomplete"));
        // A target without its id line.
        assert!(refused("kcopyd-map 2\nsource 0 x\nid a\ntarget 0 y\nlength 512\n").contains("line 5"));
        assert!(refused("kcopyd-map 1\nsource 0 x\ntarget 0 y\nlength 512\n").contains("no identity"));
    }

    #[test]
    fn a_file_that_is_not_a_map_is_refused_after_its_first_line() {
        // A reader that fails past the first LINE_BYTES_MAX bytes stands for a huge file.
        struct Endless(u64);
        impl Read for Endless {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                assert!(self.0 <= LINE_BYTES_MAX as u64, "read past the first line's bound");
                buf.fill(b'x');
                self.0 += buf.len() as u64;
                Ok(buf.len())
            }
        }
        let error = parse(BufReader::with_capacity(4096, Endless(0))).unwrap_err();
        assert!(error.to_string().contains("not a kcopyd map"), "{error}");
        let long = header().render() + &"x".repeat(LINE_BYTES_MAX) + "\n";
        assert!(parse_text(&long).unwrap_err().to_string().contains("line 7: longer than"));
        let binary = [header().render().as_bytes(), b"done \xff\n"].concat();
        assert!(parse(&binary[..]).unwrap_err().to_string().contains("line 7: not text"));
    }

    #[test]
    fn batches_merge_small_done_gaps_but_never_a_failed_one_and_bound_jobs_and_sectors() {
        let work: RangeSet = [0..2, 10..12, 400..409].into_iter().collect();
        let gap = GAP_MERGE_BYTES / SECTOR_SIZE as u64;
        assert!((128..398).contains(&gap));
        let found = batches(&work, &RangeSet::new(), 4);
        let expected: Vec<Vec<Range<u64>>> =
            vec![vec![0..4], vec![4..8], vec![8..12], vec![400..404], vec![404..408], vec![408..409]];
        assert_eq!(found, expected);
        // A failed sector in the gap keeps the ranges apart (it is not read again).
        let failed = RangeSet::from_range(5..6);
        assert_eq!(batches(&work, &failed, 1 << 20), vec![vec![0..2, 10..12, 400..409]]);
        // A million one-sector ranges far apart: batches of at most JOBS_PER_BATCH_MAX jobs.
        let scattered: RangeSet = (0..1_000_000u64).map(|i| i * 1000..i * 1000 + 1).collect();
        let found = batches(&scattered, &RangeSet::new(), 1 << 30);
        assert!(found.iter().all(|b| b.len() <= JOBS_PER_BATCH_MAX));
        assert_eq!(found.iter().map(Vec::len).sum::<usize>(), 1_000_000);
        assert_eq!(found.len(), 1_000_000usize.div_ceil(JOBS_PER_BATCH_MAX));
        // The same ranges close together: one job per batch's worth of sectors.
        let close: RangeSet = (0..1_000_000u64).map(|i| i * 4..i * 4 + 1).collect();
        let found = batches(&close, &RangeSet::new(), 1 << 20);
        assert_eq!(found.len(), 4, "{} batches", found.len());
        assert!(found.iter().all(|b| b.len() == 1));
    }
    /// Copies what `map` says remains, in batches, as the command does: returns at the first
    /// job with errors or failed flush.
    async fn copy_remaining(
        client: &kcopyd_core::Client,
        map: &mut CopyMap,
        len_sectors: u64,
        batch_sectors: u64,
        (source, targets): (&Device, &[(Device, u64)]),
    ) {
        let work = map.state.remaining(len_sectors);
        for batch in batches(&work, &map.state.failed(), batch_sectors) {
            let mut jobs = Vec::new();
            for range in batch {
                let job = batch_job(&range, (source, 0), targets, Flags::empty(), Sparse::OFF);
                let outcome = client.submit(job).await.unwrap().await;
                let ok = outcome.is_ok();
                jobs.push((range, outcome));
                if !ok {
                    break;
                }
            }
            let flushes = finish_batch(map, &jobs, 0, targets).await.unwrap();
            if jobs.iter().any(|(_, outcome)| !outcome.is_ok()) || flushes.iter().any(Option::is_some) {
                return;
            }
        }
    }

    const LEN_SECTORS: u64 = 32 * 1024; // 16 MiB
    const BATCH_SECTORS: u64 = 4096; // 2 MiB

    /// A patterned source and a target with a volatile write cache (which a crash loses),
    /// each timed as a disk of 200 MB/s.
    fn crash_disks(len_sectors: u64) -> (std::sync::Arc<kcopyd_sim::MemDisk>, std::sync::Arc<kcopyd_sim::MemDisk>) {
        use kcopyd_sim::{FaultPlan, IoModel, Latency, MemDisk, MemDiskOptions};
        let model = IoModel { cost_us: 100, bandwidth_bytes_per_s: 200_000_000, queue_depth: 4, jitter_us: 0 };
        let source = std::sync::Arc::new(MemDisk::new(MemDiskOptions {
            name: "source".into(),
            len_sectors,
            latency: Latency { read: model, ..Latency::default() },
            ..MemDiskOptions::default()
        }));
        source.fill_pattern(5);
        let target = std::sync::Arc::new(MemDisk::new(MemDiskOptions {
            name: "target".into(),
            len_sectors,
            latency: Latency { write: model, ..Latency::default() },
            faults: FaultPlan { volatile_cache: true, ..FaultPlan::default() },
            ..MemDiskOptions::default()
        }));
        (source, target)
    }

    /// A copy in batches whose target crashes (its volatile cache lost) at `crash_ms` of
    /// virtual time, then resumed from the map as a new run would: returns nothing, asserts.
    fn crash_and_resume(crash_ms: u64) {
        use std::time::Duration;

        use kcopyd_core::{BlockDevice, ClientConfig};
        use kcopyd_sim::{Simulation, to_tokio};

        let (source, target) = crash_disks(LEN_SECTORS);
        let path = std::env::temp_dir().join(format!("kcopyd-map-crash-{}-{crash_ms}.map", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let header = MapHeader {
            source: device(0, "sim:source", "sim size=16777216"),
            targets: vec![device(0, "sim:target", "sim size=16777216")],
            len_bytes: LEN_SECTORS * 512,
        };
        let source_device: Device = source.clone();
        let targets: Vec<(Device, u64)> = vec![(target.clone(), 0)];
        let copy = |crash: Option<Duration>| {
            let mut map = CopyMap::open(&path, &header, &MapGuard::default()).unwrap();
            map.keep();
            let (source_device, targets, target) = (source_device.clone(), targets.clone(), target.clone());
            Simulation::run(ClientConfig::default(), |client, _| async move {
                if let Some(crash) = crash {
                    tokio::task::spawn_local(async move {
                        tokio::time::sleep(to_tokio(crash)).await;
                        target.crash();
                    });
                }
                copy_remaining(&client, &mut map, LEN_SECTORS, BATCH_SECTORS, (&source_device, &targets)).await;
                map.state.clone()
            })
            .unwrap()
        };
        let crashed = copy(Some(Duration::from_millis(crash_ms)));
        target.restart();
        // What the map calls done survived the crash.
        for range in crashed.done.iter() {
            let len = range.end - range.start;
            assert!(target.snapshot(range.start, len) == source.snapshot(range.start, len), "{crash_ms} ms: {range:?}");
        }
        // At most the batch in flight was written beyond what the map holds.
        let written = target.stats().written_bytes;
        assert!(
            written <= (crashed.done.to_range_set().len_sectors() + BATCH_SECTORS) * 512,
            "{crash_ms} ms: {written} written"
        );
        let resumed = copy(None);
        assert_eq!(resumed.done.to_range_set(), RangeSet::from_range(0..LEN_SECTORS), "{crash_ms} ms");
        let resumed_bytes = target.stats().written_bytes - written;
        assert_eq!(
            resumed_bytes,
            (LEN_SECTORS - crashed.done.to_range_set().len_sectors()) * 512,
            "only what was not done"
        );
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
}
