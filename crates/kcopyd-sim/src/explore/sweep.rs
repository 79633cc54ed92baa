//! A sweep: the cross product of values of dotted keys, each point a scenario run on its own
//! thread (one [`Simulation`](crate::Simulation) per thread, so runs never share a clock).
//!
//! ```text
//!  --vary client.subjob_size_bytes=64K,512K --vary client.subjobs_in_flight=4,8
//!     → (64K,4) (64K,8) (512K,4) (512K,8)     every point checked before any runs
//!     → threads take the next point from a shared counter; results keep the points' order
//! ```

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use toml::Value;

use super::keys::{parse_value, set_path};
use super::{Metric, Scenario, ScenarioError, ScenarioReport, run};

/// Most points in one sweep.
pub const POINTS_MAX: usize = 10_000;

/// One varied key and its values, as typed (`KEY=V1,V2,…`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vary {
    /// The dotted key.
    pub key: String,
    /// The values, in order.
    pub values: Vec<String>,
}

impl Vary {
    /// Reads `KEY=V1,V2,…`.
    ///
    /// # Errors
    /// No `=`, an empty key, or no values.
    pub fn parse(text: &str) -> Result<Vary, ScenarioError> {
        let (key, values) = text
            .split_once('=')
            .ok_or_else(|| ScenarioError::Sweep { problem: format!("'{text}' is not KEY=V1,V2,...") })?;
        let values: Vec<String> = values.split(',').map(|v| v.trim().to_owned()).filter(|v| !v.is_empty()).collect();
        if key.trim().is_empty() || values.is_empty() {
            return Err(ScenarioError::Sweep { problem: format!("'{text}' needs a key and at least one value") });
        }
        Ok(Vary { key: key.trim().to_owned(), values })
    }
}

/// One point of a sweep and its report.
#[derive(Debug, Clone)]
pub struct SweepPoint {
    /// The value of each varied key, in the order of the `Vary` list.
    pub values: Vec<(String, String)>,
    /// What the run reported.
    pub report: ScenarioReport,
}

/// The scenario of every point, in order (the last key varies fastest).
/// The value of each varied key at one point, and the scenario they make.
type Point = (Vec<(String, String)>, Scenario);

fn points(tree: &Value, base: &Path, varies: &[Vary]) -> Result<Vec<Point>, ScenarioError> {
    let total = varies.iter().try_fold(1usize, |n, v| n.checked_mul(v.values.len())).filter(|&n| n <= POINTS_MAX);
    let Some(total) = total else {
        return Err(ScenarioError::Sweep { problem: format!("more than {POINTS_MAX} points") });
    };
    let mut out = Vec::with_capacity(total);
    for mut n in 0..total {
        let mut chosen = vec![(String::new(), String::new()); varies.len()];
        for (i, vary) in varies.iter().enumerate().rev() {
            chosen[i] = (vary.key.clone(), vary.values[n % vary.values.len()].clone());
            n /= vary.values.len();
        }
        let mut point = tree.clone();
        for (key, value) in &chosen {
            set_path(&mut point, key, parse_value(value))?;
        }
        let scenario = Scenario::from_value_in(point, base).map_err(|error| ScenarioError::Sweep {
            problem: format!(
                "at {}: {error}",
                chosen.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
            ),
        })?;
        out.push((chosen, scenario));
    }
    Ok(out)
}

/// Runs every point of the cross product of `varies` over `tree` (a scenario's value tree,
/// whose disk model files are relative to `base`) on `threads` threads, calling `on_done`
/// after each point. Every point is read and checked before any runs.
///
/// # Errors
/// A varied key or value that makes a scenario invalid (naming the point), too many points,
/// or a run that failed.
pub fn sweep(
    tree: &Value,
    base: &Path,
    varies: &[Vary],
    threads: usize,
    on_done: &(dyn Fn(&SweepPoint) + Sync),
) -> Result<Vec<SweepPoint>, ScenarioError> {
    sweep_until(tree, base, varies, threads, on_done, &AtomicBool::new(false))
}

/// [`sweep`], stopping early when `stop` is set: the workers check it between points, so
/// the points running finish and no new one starts. Returns the points that ran, in the
/// cross product's order.
///
/// # Errors
/// As [`sweep`].
pub fn sweep_until(
    tree: &Value,
    base: &Path,
    varies: &[Vary],
    threads: usize,
    on_done: &(dyn Fn(&SweepPoint) + Sync),
    stop: &AtomicBool,
) -> Result<Vec<SweepPoint>, ScenarioError> {
    let points = points(tree, base, varies)?;
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<SweepPoint, ScenarioError>>>> =
        Mutex::new((0..points.len()).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..threads.clamp(1, points.len().max(1)) {
            scope.spawn(|| {
                while !stop.load(Ordering::Acquire) {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    let Some((values, scenario)) = points.get(index) else { break };
                    let result = run(scenario).map(|report| SweepPoint { values: values.clone(), report });
                    if let Ok(point) = &result {
                        on_done(point);
                    }
                    results.lock().expect("no panic while holding the results")[index] = Some(result);
                }
            });
        }
    });
    results.into_inner().expect("no panic while holding the results").into_iter().flatten().collect()
}
/// The index of the first varied key that an earlier one already varies, if any: each key
/// is varied once, with all its values.
pub fn repeated_key(varies: &[Vary]) -> Option<usize> {
    (0..varies.len()).find(|&i| varies[..i].iter().any(|earlier| earlier.key == varies[i].key))
}

/// The order of `points` best first by `metric` (points without it last).
pub fn best_first(points: &[SweepPoint], metric: Metric) -> Vec<usize> {
    let value_of = |point: &SweepPoint| point.report.metric(metric.name).unwrap_or(f64::NAN);
    let mut order: Vec<usize> = (0..points.len()).collect();
    order.sort_by(|&a, &b| {
        let ordering = value_of(&points[a]).total_cmp(&value_of(&points[b]));
        if metric.higher_is_better { ordering.reverse() } else { ordering }
    });
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_varied_twice_is_found_at_its_second_place() {
        let varies: Vec<Vary> = ["a=1,2", "b=3", "a=4"].iter().map(|t| Vary::parse(t).unwrap()).collect();
        assert_eq!(repeated_key(&varies), Some(2));
        assert_eq!(repeated_key(&varies[..2]), None);
        assert!(best_first(&[], crate::explore::METRICS[0]).is_empty());
    }
}
