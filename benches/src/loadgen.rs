//! A load generator for any OpenAI-compatible server: streamed `/v1/completions` requests at a
//! fixed concurrency, timing what users feel — time to first token (TTFT), time per output
//! token after the first (TPOT), inter-token latency (ITL) — and throughput.
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt;
use serde_json::{json, Value};

/// What to send and how hard.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Base URL, e.g. `http://127.0.0.1:8000`.
    pub url: String,
    pub model: String,
    pub api_key: Option<String>,
    pub num_requests: usize,
    pub concurrency: usize,
    /// Prompt lengths in words, cycled through (a fixed synthetic distribution).
    pub prompt_words: Vec<usize>,
    pub max_tokens: usize,
}

/// One request's measurements.
#[derive(Clone, Debug, Default)]
pub struct RequestResult {
    pub ok: bool,
    pub ttft: Duration,
    pub e2e: Duration,
    /// Gaps between consecutive content chunks.
    pub itl: Vec<Duration>,
    /// Content chunks received.
    pub num_chunks: usize,
    /// `usage.completion_tokens` from the final chunk.
    pub completion_tokens: usize,
    pub prompt_tokens: usize,
}

/// p50/p90/p99 in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

fn percentiles(mut xs: Vec<f64>) -> Percentiles {
    if xs.is_empty() {
        return Percentiles::default();
    }
    xs.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| xs[((xs.len() - 1) as f64 * q).round() as usize];
    Percentiles {
        p50: at(0.5),
        p90: at(0.9),
        p99: at(0.99),
    }
}

/// The summary, as printed and written to JSON.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LoadReport {
    pub server: String,
    pub concurrency: usize,
    pub num_requests: usize,
    pub errors: usize,
    pub duration_s: f64,
    pub req_per_s: f64,
    pub output_tok_per_s: f64,
    pub total_tok_per_s: f64,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Content chunks received over all requests (one per token for Pagoda).
    pub num_chunks: usize,
    pub ttft_ms: Percentiles,
    pub tpot_ms: Percentiles,
    pub itl_ms: Percentiles,
}

/// Deterministic prompt of `n` words.
fn prompt(i: usize, n: usize) -> String {
    const WORDS: [&str; 16] = [
        "river", "stone", "light", "garden", "north", "music", "paper", "window", "silver",
        "harbor", "forest", "engine", "winter", "signal", "copper", "meadow",
    ];
    (0..n)
        .map(|k| WORDS[(i * 7 + k * 3) % WORDS.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

async fn one(client: &reqwest::Client, cfg: &LoadConfig, i: usize) -> RequestResult {
    let words = cfg.prompt_words[i % cfg.prompt_words.len().max(1)];
    let body = json!({
        "model": cfg.model,
        "prompt": prompt(i, words),
        "max_tokens": cfg.max_tokens,
        "temperature": 0,
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let mut req = client
        .post(format!("{}/v1/completions", cfg.url))
        .json(&body);
    if let Some(key) = &cfg.api_key {
        req = req.bearer_auth(key);
    }
    let start = Instant::now();
    let mut out = RequestResult::default();
    let Ok(resp) = req.send().await else {
        return out;
    };
    if !resp.status().is_success() {
        return out;
    }
    let mut last: Option<Instant> = None;
    let mut buf = String::new();
    let mut done = false;
    let mut stream = resp.bytes_stream();
    while let Some(Ok(bytes)) = stream.next().await {
        buf.push_str(&String::from_utf8_lossy(&bytes));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let Ok(v) = serde_json::from_str::<Value>(data) else {
                continue;
            };
            if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                out.completion_tokens = u["completion_tokens"].as_u64().unwrap_or(0) as usize;
                out.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0) as usize;
            }
            let has_text = v["choices"][0]["text"]
                .as_str()
                .is_some_and(|t| !t.is_empty());
            if has_text {
                let now = Instant::now();
                match last {
                    None => out.ttft = now - start,
                    Some(prev) => out.itl.push(now - prev),
                }
                last = Some(now);
                out.num_chunks += 1;
            }
        }
    }
    out.e2e = start.elapsed();
    out.ok = done && out.completion_tokens > 0;
    out
}

/// Sends `num_requests` requests, `concurrency` at a time, and summarizes.
pub async fn run(cfg: &LoadConfig) -> Result<LoadReport> {
    anyhow::ensure!(
        cfg.concurrency > 0 && !cfg.prompt_words.is_empty(),
        "concurrency and prompt lengths must be set"
    );
    let client = reqwest::Client::builder().build().context("http client")?;
    let start = Instant::now();
    let results: Vec<RequestResult> = futures::stream::iter(0..cfg.num_requests)
        .map(|i| {
            let client = &client;
            async move { one(client, cfg, i).await }
        })
        .buffer_unordered(cfg.concurrency)
        .collect()
        .await;
    let duration = start.elapsed().as_secs_f64();
    let ok: Vec<&RequestResult> = results.iter().filter(|r| r.ok).collect();
    let ms = |d: &Duration| d.as_secs_f64() * 1e3;
    let completion_tokens: usize = ok.iter().map(|r| r.completion_tokens).sum();
    let prompt_tokens: usize = ok.iter().map(|r| r.prompt_tokens).sum();
    Ok(LoadReport {
        server: cfg.url.clone(),
        concurrency: cfg.concurrency,
        num_requests: cfg.num_requests,
        errors: results.len() - ok.len(),
        duration_s: duration,
        req_per_s: ok.len() as f64 / duration,
        output_tok_per_s: completion_tokens as f64 / duration,
        total_tok_per_s: (completion_tokens + prompt_tokens) as f64 / duration,
        prompt_tokens,
        completion_tokens,
        num_chunks: ok.iter().map(|r| r.num_chunks).sum(),
        ttft_ms: percentiles(ok.iter().map(|r| ms(&r.ttft)).collect()),
        tpot_ms: percentiles(
            ok.iter()
                .filter(|r| r.completion_tokens > 1)
                .map(|r| (ms(&r.e2e) - ms(&r.ttft)) / (r.completion_tokens - 1) as f64)
                .collect(),
        ),
        itl_ms: percentiles(ok.iter().flat_map(|r| r.itl.iter().map(ms)).collect()),
    })
}

impl LoadReport {
    /// One Markdown table row (see [`LoadReport::TABLE_HEADER`]).
    pub fn table_row(&self) -> String {
        format!(
            "| {} | {} | {} | {:.2} | {:.1} | {:.0} / {:.0} / {:.0} | {:.1} / {:.1} / {:.1} | {:.1} / {:.1} / {:.1} |",
            self.concurrency,
            self.num_requests,
            self.errors,
            self.req_per_s,
            self.output_tok_per_s,
            self.ttft_ms.p50,
            self.ttft_ms.p90,
            self.ttft_ms.p99,
            self.tpot_ms.p50,
            self.tpot_ms.p90,
            self.tpot_ms.p99,
            self.itl_ms.p50,
            self.itl_ms.p90,
            self.itl_ms.p99
        )
    }

    pub const TABLE_HEADER: &'static str = "| concurrency | requests | errors | req/s | output tok/s | TTFT ms p50/p90/p99 | TPOT ms p50/p90/p99 | ITL ms p50/p90/p99 |\n|---:|---:|---:|---:|---:|---|---|---|";
}
