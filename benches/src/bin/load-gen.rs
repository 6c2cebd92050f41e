//! `load-gen`: streamed completions against any OpenAI-compatible server, swept over fixed
//! concurrencies or Poisson request rates; prints a table, optionally writes JSON and an SVG
//! plot of latency versus throughput.
//!
//!   load-gen --url http://127.0.0.1:8000 --model SmolLM2-135M-Instruct --concurrency 1 4 8
//!   load-gen --request-rate 1 2 4 --max-concurrency 16 --profile sharegpt --plot sweep.svg
use std::path::PathBuf;

use anyhow::ensure;
use clap::Parser;
use pagoda_benches::lengths::{self, RequestShape};
use pagoda_benches::loadgen::{run, Arrival, LoadConfig, LoadReport, ServerInfo};
use pagoda_benches::{load_average, MachineInfo};

#[derive(Parser)]
#[command(about = "Load generator for OpenAI-compatible servers (streamed /v1/completions)")]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    #[arg(long, default_value = "SmolLM2-135M-Instruct")]
    model: String,
    #[arg(long, env = "PAGODA_API_KEY")]
    api_key: Option<String>,
    /// What the server is, for the report (e.g. "llama-server 11434, -np 16 -t 2").
    #[arg(long)]
    label: Option<String>,
    /// Fixed concurrencies to sweep (default 1 4 8 when no --request-rate is given).
    #[arg(long, num_args = 1.., conflicts_with = "request_rate")]
    concurrency: Vec<usize>,
    /// Poisson arrival rates (requests/s) to sweep instead of fixed concurrencies.
    #[arg(long, num_args = 1..)]
    request_rate: Vec<f64>,
    /// With --request-rate: most requests in flight (later arrivals wait). Default: no cap.
    #[arg(long, requires = "request_rate")]
    max_concurrency: Option<usize>,
    /// Seed of the Poisson arrival times.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Requests per run (per concurrency or rate).
    #[arg(long, default_value_t = 32)]
    num_requests: usize,
    /// Untimed requests sent one at a time before the first run.
    #[arg(long, default_value_t = 1)]
    num_warmup: usize,
    /// Synthetic prompts: lengths in words (≈ tokens), cycled.
    #[arg(long, num_args = 1.., default_values_t = [32usize, 64, 128, 256], conflicts_with = "profile")]
    prompt_words: Vec<usize>,
    /// Synthetic prompts: output tokens per request.
    #[arg(long, default_value_t = 128, conflicts_with = "profile")]
    max_tokens: usize,
    /// Request lengths from a profile instead: `sharegpt` (the committed ShareGPT-like profile,
    /// benches/profiles/sharegpt-like.csv) or a CSV of prompt_len,output_len.
    #[arg(long)]
    profile: Option<String>,
    /// Write the runs, the server and the machine as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw latency (TTFT p50/p99, TPOT p50/p99) versus output tok/s over the runs as SVG.
    #[arg(long)]
    plot: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (shapes, source): (Vec<RequestShape>, String) = match &args.profile {
        Some(p) if p == "sharegpt" => (
            lengths::load_profile(p)?,
            "sharegpt: the ShareGPT-like profile (benches/profiles/sharegpt-like.csv)".into(),
        ),
        Some(p) => (lengths::load_profile(p)?, format!("profile {p}")),
        None => (
            lengths::synthetic(&args.prompt_words, args.max_tokens),
            format!(
                "synthetic: prompt words {:?}, {} output tokens",
                args.prompt_words, args.max_tokens
            ),
        ),
    };
    ensure!(
        shapes.iter().all(|s| s.output_len > 0),
        "output lengths must be at least 1"
    );
    let arrivals: Vec<Arrival> = if !args.request_rate.is_empty() {
        args.request_rate
            .iter()
            .map(|&rate| Arrival::Poisson {
                rate,
                max_concurrency: args.max_concurrency,
                seed: args.seed,
            })
            .collect()
    } else if args.concurrency.is_empty() {
        [1, 4, 8].map(Arrival::Concurrency).to_vec()
    } else {
        args.concurrency
            .iter()
            .map(|&c| Arrival::Concurrency(c))
            .collect()
    };

    let machine = MachineInfo::detect();
    let server = ServerInfo::probe(&args.url, args.api_key.as_deref(), args.label.clone()).await;
    println!(
        "server {} ({}) model {}; prompts {source}; client on {} ({} cores)",
        args.url,
        server
            .http_server
            .as_deref()
            .or(server.label.as_deref())
            .unwrap_or("no Server header"),
        args.model,
        machine.cpu_model,
        machine.num_cores
    );
    // Every run (and the warm-up) sends prompts of its own, the same ones for every server.
    let config = |arrival, num_requests, first_request| LoadConfig {
        url: args.url.clone(),
        model: args.model.clone(),
        api_key: args.api_key.clone(),
        num_requests,
        arrival,
        shapes: shapes.clone(),
        first_request,
    };
    let warmup_first = arrivals.len() * args.num_requests;
    if args.num_warmup > 0 {
        let warm = run(&config(
            Arrival::Concurrency(1),
            args.num_warmup,
            warmup_first,
        ))
        .await?;
        if warm.errors > 0 {
            eprintln!(
                "warm-up: {} of {} failed: {:?}",
                warm.errors, args.num_warmup, warm.error_samples
            );
        }
    }
    let load_before = load_average();
    println!("{}", LoadReport::TABLE_HEADER);
    let mut reports = Vec::new();
    for (k, arrival) in arrivals.into_iter().enumerate() {
        let report = run(&config(arrival, args.num_requests, k * args.num_requests)).await?;
        println!("{}", report.table_row());
        for e in &report.error_samples {
            eprintln!("  error: {e}");
        }
        reports.push(report);
    }
    let load_after = load_average();
    if let Some(path) = &args.json {
        let unix_time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let out = serde_json::json!({
            "tool": "load-gen",
            "unix_time": unix_time,
            "model": args.model,
            "server": server,
            "machine": machine,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "prompts": source,
            "num_warmup": args.num_warmup,
            "runs": reports,
        });
        std::fs::write(path, serde_json::to_string_pretty(&out)?)?;
    }
    if let Some(path) = &args.plot {
        let name = args.label.as_deref().unwrap_or(&args.url);
        pagoda_benches::plot::latency_vs_throughput(
            &[pagoda_benches::plot::Series {
                name,
                runs: &reports,
            }],
            &format!("{} — {}", args.model, source),
            path,
        )?;
    }
    Ok(())
}
