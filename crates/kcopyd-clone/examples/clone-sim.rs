//! `clone-sim SCENARIO [--set KEY=VALUE]… [--vary KEY=V1,V2,…]… [--json]`: runs a clone
//! scenario (scenarios/clone-hydration.toml) in the simulator and prints the hydration time
//! and the application's latency, or a table over the varied keys.
//!
//! ```text
//!  cargo run --release -p kcopyd-clone --example clone-sim -- scenarios/clone-hydration.toml \
//!      --vary clone.region_size_bytes=64K,1M --vary clone.options.hydration_threshold=1,64
//! ```
//!
//! Exit status: 0, 1 if the scenario cannot be read or run, 2 for bad usage.

use std::path::Path;
use std::process::ExitCode;

use kcopyd_clone::explore::{self, ClonePoint, CloneScenario};
use kcopyd_sim::explore::{Vary, parse_tree, parse_value, set_path};

const USAGE: &str = "usage: clone-sim SCENARIO [--set KEY=VALUE]... [--vary KEY=V1,V2,...]... [--json]";

struct Args {
    scenario: String,
    sets: Vec<(String, String)>,
    varies: Vec<Vary>,
    json: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args { scenario: String::new(), sets: Vec::new(), varies: Vec::new(), json: false };
    let mut words = std::env::args().skip(1);
    while let Some(word) = words.next() {
        match word.as_str() {
            "--set" => {
                let text = words.next().ok_or("--set needs KEY=VALUE")?;
                let (key, value) = text.split_once('=').ok_or(format!("--set '{text}' is not KEY=VALUE"))?;
                args.sets.push((key.to_owned(), value.to_owned()));
            }
            "--vary" => {
                let text = words.next().ok_or("--vary needs KEY=V1,V2,...")?;
                args.varies.push(Vary::parse(&text).map_err(|e| e.to_string())?);
            }
            "--json" => args.json = true,
            _ if args.scenario.is_empty() && !word.starts_with('-') => args.scenario = word,
            _ => return Err(format!("unexpected argument '{word}'")),
        }
    }
    if args.scenario.is_empty() {
        return Err("no SCENARIO".into());
    }
    Ok(args)
}

fn table(points: &[ClonePoint]) -> String {
    let mut out = String::new();
    if let Some(first) = points.first() {
        for (key, _) in &first.values {
            out += &format!("{key:>34}  ");
        }
    }
    out += "hydration_s  hours_per_tib  fg_p50_ms  fg_p99_ms  hydrated_p99_ms  writes_waited\n";
    for point in points {
        for (_, value) in &point.values {
            out += &format!("{value:>34}  ");
        }
        let r = &point.report;
        let p = |l: Option<explore::LatencySummary>, f: fn(&explore::LatencySummary) -> f64| {
            l.map_or("-".to_owned(), |l| format!("{:.3}", f(&l)))
        };
        out += &format!(
            "{:>11.1}  {:>13.2}  {:>9}  {:>9}  {:>15}  {:>13}\n",
            r.hydration_seconds,
            r.hours_per_tib,
            p(r.foreground, |l| l.p50_ms),
            p(r.foreground, |l| l.p99_ms),
            p(r.baseline, |l| l.p99_ms),
            r.stats.writes_waited
        );
    }
    out
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(problem) => {
            eprintln!("clone-sim: {problem}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = (|| -> Result<String, Box<dyn std::error::Error>> {
        let text = std::fs::read_to_string(&args.scenario).map_err(|e| format!("{}: {e}", args.scenario))?;
        let mut tree = parse_tree(&text)?;
        for (key, value) in &args.sets {
            set_path(&mut tree, key, parse_value(value))?;
        }
        let base = Path::new(&args.scenario).parent().unwrap_or(Path::new("."));
        if args.varies.is_empty() {
            let report = explore::run(&CloneScenario::from_value_in(tree, base)?)?;
            return Ok(if args.json { serde_json::to_string_pretty(&report)? } else { report.to_string() });
        }
        let points = explore::sweep(&tree, base, &args.varies)?;
        Ok(if args.json { serde_json::to_string_pretty(&points)? } else { table(&points) })
    })();
    match result {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("clone-sim: {error}");
            ExitCode::FAILURE
        }
    }
}
