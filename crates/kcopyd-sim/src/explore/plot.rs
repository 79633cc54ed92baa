//! SVG pictures of runs and sweeps, drawn with plotters' SVG backend (feature `plot`): pure
//! functions of a report, written to the file the caller names.
//!
//! ```text
//!  run:    ┌ engine MB/s over virtual time (read, written) ┐   sweep, one key:  metric ─●─●─●
//!          └ foreground latency: with the jobs, alone      ┘   sweep, two keys: heat map, values in cells
//! ```

use std::error::Error;
use std::path::{Path, PathBuf};

use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;

use crate::explore::{Metric, Sample, ScenarioReport, SweepPoint, Vary};

/// Why a picture could not be drawn.
#[derive(Debug, thiserror::Error)]
#[error("plot '{}': {problem}", path.display())]
pub struct PlotError {
    /// The SVG file.
    pub path: PathBuf,
    /// What went wrong (plotters' message).
    pub problem: String,
}

/// Pixels of a picture.
const SIZE: (u32, u32) = (960, 640);

fn plot_error(path: &Path) -> impl Fn(Box<dyn Error>) -> PlotError + '_ {
    move |error| PlotError { path: path.to_path_buf(), problem: error.to_string() }
}

/// Throughput and foreground latency over virtual time, to the SVG file at `path`.
///
/// # Errors
/// The file cannot be written, or plotters refuses the data.
pub fn run_svg(path: &Path, report: &ScenarioReport) -> Result<(), PlotError> {
    draw_run(path, report).map_err(plot_error(path))
}

fn draw_run(path: &Path, report: &ScenarioReport) -> Result<(), Box<dyn Error>> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(SIZE.1 / 2);
    let x_max = report.timeline.last().map_or(1.0, |s| s.at_s + report.bucket_s).max(1e-6);
    let mb = |v: f64| v / 1e6;
    let y_max = report.timeline.iter().map(|s| mb(s.read_bytes_per_s.max(s.written_bytes_per_s))).fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&top)
        .caption("Engine throughput over virtual time", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max * 1.1)?;
    chart.configure_mesh().x_desc("virtual time (s)").y_desc("MB/s").draw()?;
    let series = |f: fn(&Sample) -> f64| {
        report.timeline.iter().map(move |s| (s.at_s + report.bucket_s / 2.0, mb(f(s)))).collect::<Vec<_>>()
    };
    chart
        .draw_series(LineSeries::new(series(|s| s.read_bytes_per_s), BLUE.stroke_width(2)))?
        .label("read (copy progress)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart
        .draw_series(LineSeries::new(series(|s| s.written_bytes_per_s), RED))?
        .label("written (all targets)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;

    draw_latency(&bottom, report, x_max)?;
    root.present()?;
    Ok(())
}

/// The lower half of a run's picture: the foreground's latency over virtual time, with the
/// jobs (mean and largest) and alone.
fn draw_latency(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    report: &ScenarioReport,
    x_max: f64,
) -> Result<(), Box<dyn Error>> {
    let series = |f: fn(&Sample) -> Option<f64>| -> Vec<(f64, f64)> {
        report.timeline.iter().filter_map(|s| f(s).map(|v| (s.at_s + report.bucket_s / 2.0, v))).collect()
    };
    let with_jobs = series(|s| s.foreground_ms_mean);
    let maxes = series(|s| s.foreground_ms_max);
    let alone = series(|s| s.foreground_alone_ms_mean);
    let caption = if report.foreground.is_some() {
        "Foreground latency over virtual time"
    } else {
        "Foreground latency (no foreground in this scenario)"
    };
    let y_max = maxes.iter().chain(&with_jobs).chain(&alone).map(|p| p.1).fold(0.01, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max * 1.1)?;
    chart.configure_mesh().x_desc("virtual time (s)").y_desc("ms").draw()?;
    if report.foreground.is_some() {
        chart
            .draw_series(LineSeries::new(maxes, RED.mix(0.35)))?
            .label("largest, with the jobs")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.mix(0.35)));
        chart
            .draw_series(LineSeries::new(with_jobs, RED.stroke_width(2)))?
            .label("mean, with the jobs")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        chart
            .draw_series(LineSeries::new(alone, GREEN.stroke_width(2)))?
            .label("mean, alone")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN));
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    }
    Ok(())
}

/// The metric of a sweep, to the SVG file at `path`: a line over one key's values, or a heat
/// map over two keys' values.
///
/// # Errors
/// Not one or two varied keys, the file cannot be written, or plotters refuses the data.
pub fn sweep_svg(path: &Path, varies: &[Vary], points: &[SweepPoint], metric: Metric) -> Result<(), PlotError> {
    let drawn = match varies {
        [key] => draw_line(path, key, points, metric),
        [x, y] => draw_heat_map(path, x, y, points, metric),
        _ => Err("a plot takes one or two varied keys".into()),
    };
    drawn.map_err(plot_error(path))
}

fn label(values: &[String], at: &SegmentValue<i32>) -> String {
    match at {
        SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => values.get(*i as usize).cloned().unwrap_or_default(),
        SegmentValue::Last => String::new(),
    }
}

fn draw_line(path: &Path, key: &Vary, points: &[SweepPoint], metric: Metric) -> Result<(), Box<dyn Error>> {
    let values: Vec<(i32, f64)> =
        points.iter().enumerate().filter_map(|(i, p)| p.report.metric(metric.name).map(|v| (i as i32, v))).collect();
    let y_max = values.iter().map(|v| v.1).fold(1e-9, f64::max);
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let n = points.len() as i32;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{} by {}", metric.name, key.key), ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((0..(n - 1).max(0)).into_segmented(), 0.0..y_max * 1.1)?;
    let format_x = |at: &SegmentValue<i32>| label(&key.values, at);
    chart
        .configure_mesh()
        .x_labels(points.len())
        .x_label_formatter(&format_x)
        .x_desc(key.key.as_str())
        .y_desc(metric.meaning)
        .draw()?;
    let line: Vec<(SegmentValue<i32>, f64)> = values.iter().map(|&(i, v)| (SegmentValue::CenterOf(i), v)).collect();
    chart.draw_series(LineSeries::new(line.clone(), BLUE.stroke_width(2)))?;
    chart.draw_series(line.iter().map(|(x, y)| Circle::new((x.clone(), *y), 4, BLUE.filled())))?;
    chart
        .draw_series(line.iter().map(|(x, y)| {
            Text::new(format!("{y:.1}"), (x.clone(), *y), ("sans-serif", 13).into_font().color(&BLACK))
        }))?;
    root.present()?;
    Ok(())
}

fn draw_heat_map(path: &Path, x: &Vary, y: &Vary, points: &[SweepPoint], metric: Metric) -> Result<(), Box<dyn Error>> {
    let (nx, ny) = (x.values.len() as i32, y.values.len() as i32);
    let values: Vec<Option<f64>> = points.iter().map(|p| p.report.metric(metric.name)).collect();
    let (low, high) = values.iter().flatten().fold((f64::MAX, f64::MIN), |(l, h), &v| (l.min(v), h.max(v)));
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let better = if metric.higher_is_better { "higher is better" } else { "lower is better" };
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{} ({better})", metric.name), ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(90)
        .build_cartesian_2d((0..(nx - 1).max(0)).into_segmented(), (0..(ny - 1).max(0)).into_segmented())?;
    let format_x = |at: &SegmentValue<i32>| label(&x.values, at);
    let format_y = |at: &SegmentValue<i32>| label(&y.values, at);
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(x.values.len())
        .y_labels(y.values.len())
        .x_label_formatter(&format_x)
        .y_label_formatter(&format_y)
        .x_desc(x.key.as_str())
        .y_desc(y.key.as_str())
        .draw()?;
    // Points are in cross-product order: the second key varies fastest.
    let cells: Vec<(i32, i32, Option<f64>)> =
        values.iter().enumerate().map(|(i, v)| (i as i32 / ny, i as i32 % ny, *v)).collect();
    let colour = |v: Option<f64>| match v {
        None => RGBColor(220, 220, 220),
        Some(v) => {
            // Good cells green, bad ones red, whichever way the metric points.
            let mut share = if high > low { (v - low) / (high - low) } else { 1.0 };
            if !metric.higher_is_better {
                share = 1.0 - share;
            }
            let mix = |bad: f64, good: f64| (bad + (good - bad) * share).round() as u8;
            RGBColor(mix(222.0, 102.0), mix(96.0, 189.0), mix(86.0, 99.0))
        }
    };
    chart.draw_series(cells.iter().map(|&(i, j, v)| {
        Rectangle::new(
            [
                (SegmentValue::Exact(i), SegmentValue::Exact(j)),
                (SegmentValue::Exact(i + 1), SegmentValue::Exact(j + 1)),
            ],
            colour(v).filled(),
        )
    }))?;
    chart.draw_series(cells.iter().map(|&(i, j, v)| {
        let text = v.map_or("-".to_owned(), |v| format!("{v:.1}"));
        Text::new(
            text,
            (SegmentValue::CenterOf(i), SegmentValue::CenterOf(j)),
            ("sans-serif", 14).into_font().color(&BLACK),
        )
    }))?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sweep_plot_takes_one_or_two_keys_and_names_its_file() {
        let path = Path::new("/nonexistent-dir/sweep.svg");
        let error = sweep_svg(path, &[], &[], crate::explore::METRICS[0]).unwrap_err();
        assert_eq!(error.path, path);
        assert_eq!(error.to_string(), "plot '/nonexistent-dir/sweep.svg': a plot takes one or two varied keys");
    }
}
