//! `load-compare`: two `load-gen --json` files of the same sweep (a baseline server and Pagoda)
//! side by side: one Markdown table with both servers' numbers and the ratios, the two files
//! and the ratios as one JSON, and optionally both sweeps in one latency-versus-throughput SVG.
//! `benches/compare-llamacpp` uses it.
//!
//!   load-compare --baseline llama.json --baseline-name llama.cpp \
//!                --candidate pagoda.json --candidate-name Pagoda --json both.json --plot both.svg
use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use clap::Parser;
use pagoda_benches::loadgen::LoadReport;
use pagoda_benches::plot::{latency_vs_throughput, Series};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(about = "Two load-gen sweeps side by side, with ratios")]
struct Args {
    #[arg(long)]
    baseline: PathBuf,
    #[arg(long, default_value = "baseline")]
    baseline_name: String,
    #[arg(long)]
    candidate: PathBuf,
    #[arg(long, default_value = "Pagoda")]
    candidate_name: String,
    /// Write both files and the ratios as one JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw both sweeps' latency versus throughput as SVG.
    #[arg(long)]
    plot: Option<PathBuf>,
}

fn read(path: &PathBuf) -> Result<(Value, Vec<LoadReport>)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value: Value = serde_json::from_str(&text).with_context(|| path.display().to_string())?;
    let runs = serde_json::from_value(value["runs"].clone())
        .with_context(|| format!("{}: no load-gen runs", path.display()))?;
    Ok((value, runs))
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let (base_json, base) = read(&args.baseline)?;
    let (cand_json, cand) = read(&args.candidate)?;
    ensure!(
        base.len() == cand.len() && base.iter().zip(&cand).all(|(a, b)| a.load() == b.load()),
        "the two files are not the same sweep"
    );
    let (b, c) = (&args.baseline_name, &args.candidate_name);
    println!(
        "| load | output tok/s {b} | output tok/s {c} | {c} ÷ {b} | TTFT ms p50 / p99 {b} | TTFT ms p50 / p99 {c} | TPOT ms p50 / p99 {b} | TPOT ms p50 / p99 {c} | req/s {b} / {c} | errors {b} / {c} |"
    );
    println!("|---|---:|---:|---:|---|---|---|---|---|---|");
    let mut ratios = Vec::new();
    for (x, y) in base.iter().zip(&cand) {
        let r = ratio(y.output_tok_per_s, x.output_tok_per_s);
        println!(
            "| {} | {:.1} | {:.1} | {:.2}× | {:.0} / {:.0} | {:.0} / {:.0} | {:.1} / {:.1} | {:.1} / {:.1} | {:.2} / {:.2} | {} / {} |",
            x.load(),
            x.output_tok_per_s,
            y.output_tok_per_s,
            r,
            x.ttft_ms.p50,
            x.ttft_ms.p99,
            y.ttft_ms.p50,
            y.ttft_ms.p99,
            x.tpot_ms.p50,
            x.tpot_ms.p99,
            y.tpot_ms.p50,
            y.tpot_ms.p99,
            x.req_per_s,
            y.req_per_s,
            x.errors,
            y.errors
        );
        ratios.push(json!({
            "load": x.load(),
            "output_tok_per_s": r,
            "total_tok_per_s": ratio(y.total_tok_per_s, x.total_tok_per_s),
            "ttft_p50": ratio(y.ttft_ms.p50, x.ttft_ms.p50),
            "tpot_p50": ratio(y.tpot_ms.p50, x.tpot_ms.p50),
        }));
    }
    println!(
        "\nRatios are {c} ÷ {b}: above 1 is better for tok/s, below 1 is better for TTFT and TPOT."
    );
    if let Some(path) = &args.json {
        let out = json!({
            "baseline_name": b,
            "candidate_name": c,
            "ratios_candidate_over_baseline": ratios,
            "baseline": base_json,
            "candidate": cand_json,
        });
        std::fs::write(path, serde_json::to_string_pretty(&out)?)?;
    }
    if let Some(path) = &args.plot {
        latency_vs_throughput(
            &[
                Series {
                    name: b,
                    runs: &base,
                },
                Series {
                    name: c,
                    runs: &cand,
                },
            ],
            &format!("{b} vs {c}"),
            path,
        )?;
    }
    Ok(())
}
