//! Latency versus throughput over the runs of a sweep, as SVG (plotters' SVG backend; text is
//! left to the viewer's fonts, so no font library is needed).
//!
//! Two panels side by side, both with output tok/s on x: TTFT p50 and p99 on the left, TPOT
//! p50 and p99 on the right. Each series (a server) is one colour: p50 solid with dots, p99
//! thin with triangles, in the order of its runs (a sweep of concurrency or request rate); each
//! p50 point is labelled with its run's load.
use std::path::Path;

use anyhow::{ensure, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::loadgen::LoadReport;

/// One server's runs.
pub struct Series<'a> {
    pub name: &'a str,
    pub runs: &'a [LoadReport],
}

const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

/// Writes the plot to `path` (SVG).
pub fn latency_vs_throughput(series: &[Series], title: &str, path: &Path) -> Result<()> {
    ensure!(
        series.iter().any(|s| !s.runs.is_empty()),
        "nothing to plot: no runs"
    );
    let root = SVGBackend::new(path, (1200, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    let (left, right) = root.split_horizontally(600);
    panel(&left, series, "TTFT", |r| (r.ttft_ms.p50, r.ttft_ms.p99))?;
    panel(&right, series, "TPOT", |r| (r.tpot_ms.p50, r.tpot_ms.p99))?;
    root.present()?;
    Ok(())
}

fn panel(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    series: &[Series],
    metric: &str,
    value: impl Fn(&LoadReport) -> (f64, f64),
) -> Result<()> {
    let runs = || series.iter().flat_map(|s| s.runs.iter());
    let x_max = runs().map(|r| r.output_tok_per_s).fold(0.0, f64::max) * 1.1;
    let y_max = runs()
        .map(|r| value(r).1.max(value(r).0))
        .fold(0.0, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption(format!("{metric} vs throughput"), ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max.max(1.0), 0.0..y_max.max(1.0))?;
    chart
        .configure_mesh()
        .x_desc("output tok/s")
        .y_desc(format!("{metric} ms"))
        .draw()?;
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let p50: Vec<(f64, f64)> = s
            .runs
            .iter()
            .map(|r| (r.output_tok_per_s, value(r).0))
            .collect();
        let p99: Vec<(f64, f64)> = s
            .runs
            .iter()
            .map(|r| (r.output_tok_per_s, value(r).1))
            .collect();
        chart
            .draw_series(LineSeries::new(p50.clone(), color.stroke_width(2)))?
            .label(format!("{} p50", s.name))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(p50.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
        // Each p50 point names its run's load (`c=8`, `2.00 req/s`).
        chart.draw_series(s.runs.iter().zip(&p50).map(|(r, &p)| {
            let font = ("sans-serif", 11).into_font().color(&color);
            EmptyElement::at(p) + Text::new(r.load(), (6, -14), font)
        }))?;
        chart
            .draw_series(LineSeries::new(p99.clone(), color.mix(0.6).stroke_width(1)))?
            .label(format!("{} p99", s.name))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.mix(0.6).stroke_width(1))
            });
        chart.draw_series(
            p99.iter()
                .map(|&p| TriangleMarker::new(p, 5, color.mix(0.6).filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}
