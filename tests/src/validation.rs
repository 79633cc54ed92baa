//! Validation at submit, checked against an independent reference: random regions on shared
//! devices, and the engine's `SubmitError` compared with what a plain predicate says is wrong.
//!
//! ```text
//!  seed ──from_seed()──► ValidationCase: 1–3 shared devices (512 B or 4 KiB blocks), a source (or a
//!                              zero job), targets placed against earlier regions: identical,
//!                              shifted by a block, adjacent, inside, outside, past the end
//!        ──reference()──► every rule the case breaks (empty: it must run and succeed)
//!        ──run()────────► the engine's answer; a refusal must be one of the broken rules, and
//!                         no device may have seen a request
//! ```
//!
//! The engine stops at the first rule broken, in an order of its own; the reference lists
//! every broken rule, so the check is that the engine's error names one of them (with the same
//! target, device and sectors) and that a case breaking none is accepted.

use std::ops::Range;
use std::sync::Arc;

use kcopyd_core::{
    Client, ClientConfig, ConfigError, Device, Flags, Job, PAGE_SIZE, Region, SECTOR_SIZE, Sparse, SubmitError,
    TARGETS_MAX, TargetZeroes, Throttle,
};
use kcopyd_sim::{MemDisk, Simulation, mix64, to_tokio};
use serde::{Deserialize, Serialize};

use crate::scenario::{DEADLOCK_AFTER, Draw};

/// A region of a case.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionInputs {
    /// Index of the device.
    pub device: usize,
    /// First sector.
    pub start_sector: u64,
    /// Sectors.
    pub len_sectors: u64,
}

impl RegionInputs {
    /// Its sectors, with the end widened so that it cannot overflow.
    fn span(&self) -> Range<u128> {
        u128::from(self.start_sector)..u128::from(self.start_sector) + u128::from(self.len_sectors)
    }
}

/// One submission to validate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidationCase {
    /// Devices: (length in sectors, logical block size in bytes).
    pub devices: Vec<(u64, u32)>,
    /// The source (`None`: a zero job).
    pub source: Option<RegionInputs>,
    /// The targets.
    pub targets: Vec<RegionInputs>,
    /// The client's page budget, in pages.
    #[serde(default = "default_page_budget")]
    pub page_budget: usize,
    /// A copy's zero-scan block size (`Sparse::zero_block_bytes`), when the copy is sparse.
    #[serde(default)]
    pub zero_block_bytes: Option<u32>,
    /// A throttle given to the client before the job (`Client::set_throttle`), valid or not.
    #[serde(default)]
    pub throttle: Option<Throttle>,
}

/// Zero-scan block sizes drawn for sparse copies: off, the valid powers of two from a sector
/// up, and the sizes the engine must refuse (under a sector, not a power of two).
const ZERO_BLOCK_SIZES: [u32; 11] = [0, 512, 4096, 8192, 1 << 20, 1 << 31, 1, 256, 511, 768, 3000];

/// Whether the engine takes `bytes` as a zero-scan block size: off, or a power of two of at
/// least a sector.
fn zero_block_valid(bytes: u32) -> bool {
    bytes == 0 || (bytes.is_power_of_two() && bytes as usize >= SECTOR_SIZE)
}

/// Busy percentages drawn for throttles: none, the valid ones at and near their bounds, and
/// those the client must refuse (0, over 100).
const BUSY_PERCENTS: [Option<u32>; 8] =
    [None, Some(1), Some(50), Some(99), Some(100), Some(0), Some(101), Some(u32::MAX)];

/// Rates drawn for throttles: none, valid ones from a MiB/s to the largest, and 0 (refused).
const RATES: [Option<u64>; 5] = [None, Some(1 << 20), Some(64 << 20), Some(u64::MAX), Some(0)];

/// For one case in four, a throttle for its client (valid or not), from a stream of its own.
fn throttle_of(seed: u64) -> Option<Throttle> {
    let mut rng = Draw(mix64(seed ^ 0x7407_71e5));
    (rng.below(4) == 0).then(|| Throttle {
        busy_percent: BUSY_PERCENTS[rng.below(BUSY_PERCENTS.len() as u64) as usize],
        rate_bytes_per_s: RATES[rng.below(RATES.len() as u64) as usize],
    })
}

fn default_page_budget() -> usize {
    8
}

/// A rule a case breaks, as the reference sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokenRule {
    /// No targets.
    NoTargets,
    /// More than `TARGETS_MAX` targets.
    TooManyTargets,
    /// Target `i`'s length differs from the source's (or the first target's).
    CountMismatch(usize),
    /// A region (on `device`, with `sectors`) ends past its device.
    OutOfRange(usize, Range<u64>),
    /// A region's start or length is not whole blocks of its device.
    Misaligned(usize, Range<u64>),
    /// Target `i` shares a sector with the source.
    TargetOverlapsSource(usize),
    /// Targets `first` and `second` share a sector.
    TargetsOverlap(usize, usize),
    /// The job's logical block (bytes) is larger than the page budget (bytes).
    BlockLargerThanBudget(u32, usize),
    /// A sparse copy's zero-scan block size (bytes) is not 0 or a power of two of at least
    /// a sector.
    ZeroBlockSize(u32),
    /// The throttle's busy percentage is outside 1..=100.
    ThrottleBusy(u32),
    /// The throttle's rate is 0 bytes per second.
    ThrottleRate,
}

impl BrokenRule {
    /// Whether the rule is the client's (its throttle), not the job's.
    fn is_throttle(&self) -> bool {
        matches!(self, BrokenRule::ThrottleBusy(_) | BrokenRule::ThrottleRate)
    }
}

fn device_name(index: usize) -> String {
    format!("dev{index}")
}

impl ValidationCase {
    /// A case drawn from `seed`: mostly regions placed against each other on shared devices.
    pub fn from_seed(seed: u64) -> ValidationCase {
        let mut rng = Draw(mix64(seed ^ 0x7a11_da7e));
        let devices: Vec<(u64, u32)> = (0..1 + rng.below(3))
            .map(|_| (8 * (8 + rng.below(24)), if rng.below(3) == 0 { 4096 } else { 512 }))
            .collect();
        let len = match rng.below(8) {
            0 => 0,
            1..=3 => 8 * (1 + rng.below(4)),
            _ => 1 + rng.below(16),
        };
        let mut placed: Vec<RegionInputs> = Vec::new();
        let region = |rng: &mut Draw, placed: &[RegionInputs]| -> RegionInputs {
            let mut len = len;
            if rng.below(8) == 0 {
                len = [len + 1, len.saturating_sub(1), len + 8, len / 2][rng.below(4) as usize];
            }
            if let (Some(anchor), true) = (placed.get(rng.below(placed.len() as u64 + 1) as usize), rng.below(3) != 0) {
                // Against an earlier region: identical, a sector or a block off, adjacent on
                // either side, strictly inside it or around it.
                let a = anchor.len_sectors;
                let start = anchor.start_sector;
                let (start, len) = match rng.below(10) {
                    0 => (start, len),
                    1 => (start.saturating_add(1), len),
                    2 => (start.saturating_sub(1), len),
                    3 => (start.saturating_add(8), len),
                    4 => (start.saturating_sub(8), len),
                    5 => (start.saturating_add(a), len),
                    6 => (start.saturating_sub(len), len),
                    7 => (start.saturating_add(1), a.saturating_sub(2)),
                    8 => (start.saturating_sub(1), a + 2),
                    _ => (start.saturating_add(a / 2), len),
                };
                return RegionInputs { device: anchor.device, start_sector: start, len_sectors: len };
            }
            let device = rng.below(devices.len() as u64) as usize;
            let start = match rng.below(30) {
                0 => u64::MAX - rng.below(16),
                1 => devices[device].0 - rng.below(4),
                _ => rng.below(devices[device].0 + 4),
            };
            RegionInputs { device, start_sector: start, len_sectors: len }
        };
        let source = (rng.below(5) != 0).then(|| region(&mut rng, &placed));
        placed.extend(source.clone());
        let count = match rng.below(25) {
            0 => 0,
            // One past the limit, and the limit itself (then broken by overlaps, if at all).
            1 => TARGETS_MAX as u64 + rng.below(3),
            _ => 1 + rng.below(4),
        };
        let mut targets = Vec::new();
        for _ in 0..count {
            let target = region(&mut rng, &placed);
            placed.push(target.clone());
            targets.push(target);
        }
        // Now and then a one-page budget, and a device whose block is larger (8 KiB) or as
        // large (4 KiB) as it. The regions are then made whole 8 KiB blocks, so that many of
        // these cases break that rule alone.
        let (mut devices, mut source) = (devices, source);
        let page_budget = if rng.below(6) == 0 { 1 } else { default_page_budget() };
        if page_budget == 1 && rng.below(2) == 0 {
            let which = rng.below(devices.len() as u64) as usize;
            devices[which] = (devices[which].0.next_multiple_of(16), 8192);
            for region in source.iter_mut().chain(&mut targets) {
                region.len_sectors = region.len_sectors.next_multiple_of(16);
                if region.device == which {
                    region.start_sector -= region.start_sector % 16;
                }
            }
        }
        // From a stream of its own, so that the regions of every seed stay as they were.
        let mut sparse_draw = Draw(mix64(seed ^ 0x5ba2_5e0b));
        let zero_block_bytes = (source.is_some() && sparse_draw.below(5) == 0)
            .then(|| ZERO_BLOCK_SIZES[sparse_draw.below(ZERO_BLOCK_SIZES.len() as u64) as usize]);
        ValidationCase { devices, source, targets, page_budget, zero_block_bytes, throttle: throttle_of(seed) }
    }

    /// Every rule the case breaks, worked out from the regions alone.
    pub fn reference(&self) -> Vec<BrokenRule> {
        let mut broken = Vec::new();
        if let Some(throttle) = self.throttle {
            if let Some(percent) = throttle.busy_percent.filter(|p| !(1..=100).contains(p)) {
                broken.push(BrokenRule::ThrottleBusy(percent));
            }
            if throttle.rate_bytes_per_s == Some(0) {
                broken.push(BrokenRule::ThrottleRate);
            }
        }
        if self.targets.is_empty() {
            broken.push(BrokenRule::NoTargets);
        }
        if self.targets.len() > TARGETS_MAX {
            broken.push(BrokenRule::TooManyTargets);
        }
        if let Some(bytes) = self.zero_block_bytes.filter(|&bytes| self.source.is_some() && !zero_block_valid(bytes)) {
            broken.push(BrokenRule::ZeroBlockSize(bytes));
        }
        let len = self.source.as_ref().or(self.targets.first()).map_or(0, |r| r.len_sectors);
        for (i, target) in self.targets.iter().enumerate() {
            if target.len_sectors != len {
                broken.push(BrokenRule::CountMismatch(i));
            }
        }
        for region in self.source.iter().chain(&self.targets) {
            let (device_len, block_bytes) = self.devices[region.device];
            let block = u64::from(block_bytes) / SECTOR_SIZE as u64;
            let sectors = region.start_sector..region.start_sector.saturating_add(region.len_sectors);
            if region.span().end > u128::from(device_len) {
                broken.push(BrokenRule::OutOfRange(region.device, sectors.clone()));
            }
            if region.start_sector % block != 0 || region.len_sectors % block != 0 {
                broken.push(BrokenRule::Misaligned(region.device, sectors));
            }
        }
        let block_bytes = self.source.iter().chain(&self.targets).map(|r| self.devices[r.device].1).max();
        let budget_bytes = self.page_budget * PAGE_SIZE;
        if let Some(block_bytes) = block_bytes.filter(|&b| b as usize > budget_bytes) {
            broken.push(BrokenRule::BlockLargerThanBudget(block_bytes, budget_bytes));
        }
        let share = |a: &RegionInputs, b: &RegionInputs| {
            let (a, b) = (a.span(), b.span());
            a.start.max(b.start) < a.end.min(b.end)
        };
        for (i, target) in self.targets.iter().enumerate() {
            if let Some(source) = &self.source {
                if source.device == target.device && share(source, target) {
                    broken.push(BrokenRule::TargetOverlapsSource(i));
                }
            }
            for (first, earlier) in self.targets[..i].iter().enumerate() {
                if earlier.device == target.device && share(earlier, target) {
                    broken.push(BrokenRule::TargetsOverlap(first, i));
                }
            }
        }
        broken
    }

    /// Submits the case to a client on fresh devices; returns every disagreement with the
    /// reference.
    pub fn check(&self) -> Vec<String> {
        self.check_against(&self.reference())
    }

    /// Submits the case to a client on fresh devices; returns every disagreement with
    /// `expected` (the rules the case breaks: [`ValidationCase::reference`], or, to show that a
    /// disagreement is reported, a wrong list).
    pub fn check_against(&self, expected: &[BrokenRule]) -> Vec<String> {
        let (throttle_rules, job_rules): (Vec<BrokenRule>, Vec<BrokenRule>) =
            expected.iter().cloned().partition(BrokenRule::is_throttle);
        let expected = &job_rules[..];
        Simulation::block_on(async {
            let config = ClientConfig { page_budget: self.page_budget, ..ClientConfig::default() };
            let mut problems = Vec::new();
            if let Some(throttle) = self.throttle {
                problems.extend(check_throttle(&config, throttle, &throttle_rules).await);
            }
            let client = Client::start_in_current_system(config).expect("a valid configuration");
            if let Some(throttle) = self.throttle {
                problems.extend(set_throttle(&client, throttle, &throttle_rules));
            }
            let disks: Vec<Arc<MemDisk>> = self
                .devices
                .iter()
                .enumerate()
                .map(|(i, &(len, block))| Arc::new(MemDisk::zeroed(&device_name(i), len, block)))
                .collect();
            let region =
                |r: &RegionInputs| Region::new(disks[r.device].clone() as Device, r.start_sector, r.len_sectors);
            let targets = self.targets.iter().map(region).collect();
            let job = match &self.source {
                Some(source) => Job::copy(region(source), targets, Flags::empty()),
                None => Job::zero(targets, Flags::empty()),
            };
            let job = match self.zero_block_bytes {
                Some(zero_block_bytes) => {
                    job.sparse(Sparse { skip_holes: false, zero_block_bytes, target_zeroes: TargetZeroes::Write })
                }
                None => job,
            };
            match client.submit(job).await {
                Ok(handle) => {
                    let Ok(outcome) = tokio::time::timeout(to_tokio(DEADLOCK_AFTER), handle).await else {
                        // A job that never completes: leave the client as it is.
                        return vec![format!("accepted, and still running after {DEADLOCK_AFTER:?} of virtual time")];
                    };
                    if !expected.is_empty() {
                        problems.push(format!("accepted, but it breaks {} (outcome {outcome:?})", listed(expected)));
                    } else if !outcome.is_ok() {
                        problems.push(format!("a valid job failed on healthy disks: {outcome:?}"));
                    }
                }
                Err(error) => {
                    match self.named(&error) {
                        Some(rule) if expected.contains(&rule) => {}
                        Some(rule) => problems
                            .push(format!("refused with {error} ({rule:?}), expected one of {}", listed(expected))),
                        None => problems.push(format!("refused with {error}, expected one of {}", listed(expected))),
                    }
                    for (i, disk) in disks.iter().enumerate() {
                        let stats = disk.stats();
                        if stats.reads + stats.writes + stats.write_zeroes > 0 {
                            problems.push(format!("refused with {error}, yet {} saw {stats:?}", device_name(i)));
                        }
                    }
                }
            }
            client.shutdown().await;
            problems
        })
    }

    /// The rule an engine error names, if it names one of the reference's.
    fn named(&self, error: &SubmitError) -> Option<BrokenRule> {
        let device = |name: &str| (0..self.devices.len()).find(|&i| device_name(i) == name);
        Some(match error {
            SubmitError::NoTargets => BrokenRule::NoTargets,
            SubmitError::TooManyTargets { count, max } if *count == self.targets.len() && *max == TARGETS_MAX => {
                BrokenRule::TooManyTargets
            }
            SubmitError::BlockLargerThanBudget { block_size, budget_bytes } => {
                BrokenRule::BlockLargerThanBudget(*block_size, *budget_bytes)
            }
            SubmitError::CountMismatch { target, .. } => BrokenRule::CountMismatch(*target),
            SubmitError::OutOfRange { device: name, sectors, .. } => {
                BrokenRule::OutOfRange(device(name)?, sectors.clone())
            }
            SubmitError::Misaligned { device: name, sectors, .. } => {
                BrokenRule::Misaligned(device(name)?, sectors.clone())
            }
            SubmitError::TargetOverlapsSource { target, .. } => BrokenRule::TargetOverlapsSource(*target),
            SubmitError::TargetsOverlap { first, second, .. } => BrokenRule::TargetsOverlap(*first, *second),
            SubmitError::ZeroBlockSize { bytes } => BrokenRule::ZeroBlockSize(*bytes),
            _ => return None,
        })
    }
}

/// The rule a configuration error names, if it is a throttle's.
fn throttle_rule(error: &ConfigError) -> Option<BrokenRule> {
    match error {
        ConfigError::ThrottleBusy { percent } => Some(BrokenRule::ThrottleBusy(*percent)),
        ConfigError::ThrottleRate { bytes_per_s: 0 } => Some(BrokenRule::ThrottleRate),
        _ => None,
    }
}

/// A rule as the messages name it.
fn named_rule(rule: Option<BrokenRule>) -> String {
    rule.map_or_else(|| "no rule".to_owned(), |rule| format!("{rule:?}"))
}

/// A client started with `throttle` in its configuration: refused naming one of `expected`,
/// or, if none, started with it in force.
async fn check_throttle(config: &ClientConfig, throttle: Throttle, expected: &[BrokenRule]) -> Vec<String> {
    let config = ClientConfig { throttle, ..config.clone() };
    match Client::start_in_current_system(config) {
        Ok(client) => {
            let mut problems = Vec::new();
            if !expected.is_empty() {
                problems.push(format!("a client with {throttle:?} started, but it breaks {}", listed(expected)));
            } else if client.throttle() != throttle {
                problems.push(format!("a client started with {throttle:?} reports {:?}", client.throttle()));
            }
            client.shutdown().await;
            problems
        }
        Err(error) => match throttle_rule(&error) {
            Some(rule) if expected.contains(&rule) => Vec::new(),
            rule => vec![format!("refused with {error} ({}), expected one of {}", named_rule(rule), listed(expected))],
        },
    }
}

/// `throttle` set on a running client: refused naming one of `expected` (the throttle in
/// force unchanged), or, if none, in force from then on.
fn set_throttle(client: &Client, throttle: Throttle, expected: &[BrokenRule]) -> Vec<String> {
    let before = client.throttle();
    let mut problems = Vec::new();
    match client.set_throttle(throttle) {
        Ok(()) if !expected.is_empty() => {
            problems.push(format!("throttle {throttle:?} set, but it breaks {}", listed(expected)));
        }
        Ok(()) if client.throttle() != throttle => {
            problems.push(format!("throttle {throttle:?} set, yet the client reports {:?}", client.throttle()));
        }
        Ok(()) => {}
        Err(error) => {
            match throttle_rule(&error) {
                Some(rule) if expected.contains(&rule) => {}
                rule => {
                    problems.push(format!(
                        "refused with {error} ({}), expected one of {}",
                        named_rule(rule),
                        listed(expected)
                    ));
                }
            }
            if client.throttle() != before {
                problems.push(format!(
                    "throttle {throttle:?} refused, yet the client's changed to {:?}",
                    client.throttle()
                ));
            }
        }
    }
    problems
}

/// The rules, the first few of a long list (a case with 128 targets breaks thousands).
fn listed(rules: &[BrokenRule]) -> String {
    const SHOWN: usize = 8;
    match rules.len() {
        0..=SHOWN => format!("{rules:?}"),
        n => format!("{:?} and {} more", &rules[..SHOWN], n - SHOWN),
    }
}

/// Checks the validation cases of one swarm seed; returns every disagreement, named.
pub fn check_seed(seed: u64, cases: u64) -> Vec<String> {
    (0..cases)
        .flat_map(|n| {
            let case = ValidationCase::from_seed(mix64(seed) ^ n);
            case.check().into_iter().map(move |problem| {
                format!(
                    "validation case {n}: {problem}; case {}",
                    serde_json::to_string(&case).expect("cases serialize")
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_names_each_rule() {
        let case = |source: Option<(usize, u64, u64)>, targets: &[(usize, u64, u64)]| ValidationCase {
            devices: vec![(64, 512), (64, 4096)],
            source: source.map(|(device, start_sector, len_sectors)| RegionInputs {
                device,
                start_sector,
                len_sectors,
            }),
            targets: targets
                .iter()
                .map(|&(device, start_sector, len_sectors)| RegionInputs { device, start_sector, len_sectors })
                .collect(),
            page_budget: 1,
            zero_block_bytes: None,
            throttle: None,
        };
        assert_eq!(case(Some((0, 0, 8)), &[(0, 8, 8)]).reference(), vec![], "adjacent regions are fine");
        assert_eq!(case(Some((0, 0, 8)), &[(0, 7, 8)]).reference(), vec![BrokenRule::TargetOverlapsSource(0)]);
        assert_eq!(case(Some((0, 4, 8)), &[(0, 0, 8)]).reference(), vec![BrokenRule::TargetOverlapsSource(0)]);
        assert_eq!(
            case(Some((0, 0, 8)), &[(0, 2, 4)]).reference(),
            vec![BrokenRule::CountMismatch(0), BrokenRule::TargetOverlapsSource(0)],
            "strictly inside"
        );
        assert_eq!(
            case(None, &[(1, 8, 8), (1, 0, 16)]).reference(),
            vec![BrokenRule::CountMismatch(1), BrokenRule::TargetsOverlap(0, 1)]
        );
        assert_eq!(case(Some((0, 3, 0)), &[(0, 3, 0)]).reference(), vec![], "zero-length regions share no sector");
        assert_eq!(case(Some((0, 0, 8)), &[(1, 4, 8)]).reference(), vec![BrokenRule::Misaligned(1, 4..12)]);
        assert_eq!(case(Some((0, 60, 8)), &[(1, 0, 8)]).reference(), vec![BrokenRule::OutOfRange(0, 60..68)]);
        assert_eq!(
            case(Some((0, u64::MAX - 1, 8)), &[(1, 0, 8)]).reference(),
            vec![BrokenRule::OutOfRange(0, u64::MAX - 1..u64::MAX)]
        );
        assert_eq!(case(Some((0, 0, 8)), &[]).reference(), vec![BrokenRule::NoTargets]);
        let mut larger = case(Some((0, 0, 16)), &[(2, 16, 16)]);
        larger.devices.push((64, 8192));
        assert_eq!(larger.reference(), vec![BrokenRule::BlockLargerThanBudget(8192, 4096)]);
        assert_eq!(case(Some((1, 0, 8)), &[(1, 8, 8)]).reference(), vec![], "a block as large as the budget fits");
    }

    #[test]
    fn the_generator_breaks_every_rule_and_also_makes_valid_cases() {
        let mut seen = [0usize; 12];
        for seed in 0..3000 {
            let broken = ValidationCase::from_seed(seed).reference();
            if broken.is_empty() {
                seen[11] += 1;
            }
            for rule in broken {
                seen[match rule {
                    BrokenRule::NoTargets => 0,
                    BrokenRule::TooManyTargets => 1,
                    BrokenRule::CountMismatch(_) => 2,
                    BrokenRule::OutOfRange(..) => 3,
                    BrokenRule::Misaligned(..) => 4,
                    BrokenRule::TargetOverlapsSource(_) => 5,
                    BrokenRule::TargetsOverlap(..) => 6,
                    BrokenRule::BlockLargerThanBudget(..) => 7,
                    BrokenRule::ZeroBlockSize(_) => 8,
                    BrokenRule::ThrottleBusy(_) => 9,
                    BrokenRule::ThrottleRate => 10,
                }] += 1;
            }
        }
        assert!(seen.iter().all(|&n| n >= 20), "rules broken, and valid cases, in 3000 seeds: {seen:?}");
    }

    #[test]
    fn the_engine_agrees_with_the_reference() {
        let problems = (0..300).flat_map(|seed| check_seed(seed, 4)).collect::<Vec<_>>();
        assert!(problems.is_empty(), "{problems:#?}");
    }
}
