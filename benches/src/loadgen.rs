//! A load generator for any OpenAI-compatible server: streamed `/v1/completions` requests,
//! either at a fixed concurrency (closed loop) or arriving as a Poisson process at a given rate
//! (open loop), timing what users feel — time to first token (TTFT), time per output token after
//! the first (TPOT), inter-token latency (ITL) — and throughput.
//!
//! Every request is greedy (`temperature` 0) with `ignore_eos`, so it generates exactly its
//! `max_tokens`; its prompt and output lengths come from [`RequestShape`]s (see
//! [`crate::lengths`]). Token counts are the server's own (`usage` of the last chunk).
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use futures::StreamExt;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use crate::lengths::RequestShape;

/// How requests arrive.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arrival {
    /// Exactly this many requests in flight until the last is sent (a closed loop).
    Concurrency(usize),
    /// Poisson arrivals (an open loop): exponential gaps with mean `1 / rate` seconds, from a
    /// ChaCha8 generator seeded with `seed`; the first request goes at once. With
    /// `max_concurrency`, an arrival that finds that many in flight waits for one to finish.
    Poisson {
        rate: f64,
        max_concurrency: Option<usize>,
        seed: u64,
    },
}

/// What to send and how hard.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Base URL, e.g. `http://127.0.0.1:8000`.
    pub url: String,
    pub model: String,
    pub api_key: Option<String>,
    pub num_requests: usize,
    pub arrival: Arrival,
    /// Request `i` takes `shapes[i % shapes.len()]`.
    pub shapes: Vec<RequestShape>,
    /// Request `i` gets the prompt text of number `first_request + i`: give each run of a sweep
    /// its own range, so no prompt is sent twice and a server's prompt cache cannot help.
    pub first_request: usize,
}

/// One request's measurements.
#[derive(Clone, Debug, Default)]
pub struct RequestResult {
    /// Why the request failed; `None` when it completed.
    pub error: Option<String>,
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
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
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

/// The summary of one run, as printed and written to JSON.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct LoadReport {
    pub server: String,
    /// The fixed concurrency, or a Poisson run's cap (`None`: uncapped).
    pub concurrency: Option<usize>,
    /// Poisson arrival rate in requests/s; `None` for a fixed-concurrency run.
    #[serde(default)]
    pub request_rate: Option<f64>,
    pub num_requests: usize,
    pub errors: usize,
    /// Up to three distinct failure messages, for finding out why.
    #[serde(default)]
    pub error_samples: Vec<String>,
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

/// Deterministic prompt of `n` words for request `i`. Words are picked by a hash of `(i, k)`,
/// so prompts share no prefix beyond a word or two: a server's prefix cache gains nothing.
pub fn prompt(i: usize, n: usize) -> String {
    const WORDS: [&str; 16] = [
        "river", "stone", "light", "garden", "north", "music", "paper", "window", "silver",
        "harbor", "forest", "engine", "winter", "signal", "copper", "meadow",
    ];
    (0..n)
        .map(|k| WORDS[(splitmix64(((i as u64) << 32) ^ k as u64) % 16) as usize])
        .collect::<Vec<_>>()
        .join(" ")
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Send times of `n` Poisson arrivals at `rate` per second, from 0: exponential gaps drawn by
/// inversion from a ChaCha8 generator seeded with `seed`.
pub fn poisson_arrivals(n: usize, rate: f64, seed: u64) -> Vec<Duration> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut t = 0.0f64;
    (0..n)
        .map(|_| {
            let at = Duration::from_secs_f64(t);
            let u: f64 = rng.random();
            t += -(1.0 - u).ln() / rate;
            at
        })
        .collect()
}

async fn one(client: &reqwest::Client, cfg: &LoadConfig, i: usize) -> RequestResult {
    let shape = cfg.shapes[i % cfg.shapes.len()];
    let body = json!({
        "model": cfg.model,
        "prompt": prompt(cfg.first_request + i, shape.prompt_len),
        "max_tokens": shape.output_len,
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
    let resp = match req.send().await {
        Ok(resp) => resp,
        Err(e) => {
            out.error = Some(format!("send: {}", chain(&e)));
            return out;
        }
    };
    if !resp.status().is_success() {
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        out.error = Some(format!(
            "HTTP {status}: {}",
            text.chars().take(200).collect::<String>()
        ));
        return out;
    }
    let mut last: Option<Instant> = None;
    let mut buf = String::new();
    let mut done = false;
    let mut stream_error = None;
    let mut stream = resp.bytes_stream();
    while let Some(bytes) = stream.next().await {
        let bytes = match bytes {
            Ok(b) => b,
            Err(e) => {
                stream_error = Some(format!("stream: {}", chain(&e)));
                break;
            }
        };
        buf.push_str(&String::from_utf8_lossy(&bytes));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data:").map(str::trim) else {
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
    out.error = if let Some(e) = stream_error {
        Some(e)
    } else if !done {
        Some("the stream ended without [DONE]".into())
    } else if out.completion_tokens == 0 {
        Some("no usage with completion_tokens in the stream".into())
    } else {
        None
    };
    out
}

/// An error with its causes: reqwest's own message alone rarely says what went wrong.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Sends `num_requests` requests as `cfg.arrival` says, and summarizes.
pub async fn run(cfg: &LoadConfig) -> Result<LoadReport> {
    ensure!(!cfg.shapes.is_empty(), "no request shapes (prompt lengths)");
    // A new connection per request: llama.cpp's llama-server may close a kept-alive connection
    // after a streamed response without saying so, and a request sent on it then fails
    // ("connection closed before message completed"). Connecting over loopback costs ~0.1 ms.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .context("http client")?;
    let start = Instant::now();
    let results: Vec<RequestResult> = match cfg.arrival {
        Arrival::Concurrency(concurrency) => {
            ensure!(concurrency > 0, "concurrency must be at least 1");
            futures::stream::iter(0..cfg.num_requests)
                .map(|i| {
                    let client = &client;
                    async move { one(client, cfg, i).await }
                })
                .buffer_unordered(concurrency)
                .collect()
                .await
        }
        Arrival::Poisson {
            rate,
            max_concurrency,
            seed,
        } => {
            ensure!(
                rate.is_finite() && rate > 0.0,
                "the request rate must be positive"
            );
            ensure!(
                max_concurrency != Some(0),
                "max concurrency must be at least 1"
            );
            let slots = max_concurrency.map(|n| Arc::new(tokio::sync::Semaphore::new(n)));
            let shared = Arc::new(cfg.clone());
            let mut tasks = Vec::with_capacity(cfg.num_requests);
            for (i, at) in poisson_arrivals(cfg.num_requests, rate, seed)
                .into_iter()
                .enumerate()
            {
                tokio::time::sleep_until(tokio::time::Instant::from_std(start + at)).await;
                let permit = match &slots {
                    Some(s) => Some(s.clone().acquire_owned().await?),
                    None => None,
                };
                let (client, cfg) = (client.clone(), shared.clone());
                // A task each, so in-flight streams are read while this loop sleeps.
                tasks.push(tokio::spawn(async move {
                    let result = one(&client, &cfg, i).await;
                    drop(permit);
                    result
                }));
            }
            let mut results = Vec::with_capacity(tasks.len());
            for task in tasks {
                results.push(task.await.context("a request task panicked")?);
            }
            results
        }
    };
    let duration = start.elapsed().as_secs_f64();
    Ok(summarize(cfg, &results, duration))
}

fn summarize(cfg: &LoadConfig, results: &[RequestResult], duration: f64) -> LoadReport {
    let ok: Vec<&RequestResult> = results.iter().filter(|r| r.error.is_none()).collect();
    let mut error_samples: Vec<String> = Vec::new();
    for e in results.iter().filter_map(|r| r.error.as_ref()) {
        if error_samples.len() < 3 && !error_samples.contains(e) {
            error_samples.push(e.clone());
        }
    }
    let ms = |d: &Duration| d.as_secs_f64() * 1e3;
    let completion_tokens: usize = ok.iter().map(|r| r.completion_tokens).sum();
    let prompt_tokens: usize = ok.iter().map(|r| r.prompt_tokens).sum();
    let (concurrency, request_rate) = match cfg.arrival {
        Arrival::Concurrency(n) => (Some(n), None),
        Arrival::Poisson {
            rate,
            max_concurrency,
            ..
        } => (max_concurrency, Some(rate)),
    };
    LoadReport {
        server: cfg.url.clone(),
        concurrency,
        request_rate,
        num_requests: cfg.num_requests,
        errors: results.len() - ok.len(),
        error_samples,
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
    }
}

impl LoadReport {
    /// The load of the run in words: `c=8`, `4.00 req/s` or `4.00 req/s, c<=8`.
    pub fn load(&self) -> String {
        match (self.request_rate, self.concurrency) {
            (None, Some(c)) => format!("c={c}"),
            (Some(r), None) => format!("{r:.2} req/s"),
            (Some(r), Some(c)) => format!("{r:.2} req/s, c<={c}"),
            (None, None) => "?".into(),
        }
    }

    /// One Markdown table row (see [`LoadReport::TABLE_HEADER`]).
    pub fn table_row(&self) -> String {
        format!(
            "| {} | {} | {} | {:.2} | {:.1} | {:.1} | {:.0} / {:.0} / {:.0} | {:.1} / {:.1} / {:.1} | {:.1} / {:.1} / {:.1} |",
            self.load(),
            self.num_requests,
            self.errors,
            self.req_per_s,
            self.output_tok_per_s,
            self.total_tok_per_s,
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

    pub const TABLE_HEADER: &'static str = "| load | requests | errors | req/s | output tok/s | total tok/s | TTFT ms p50/p90/p99 | TPOT ms p50/p90/p99 | ITL ms p50/p90/p99 |\n|---|---:|---:|---:|---:|---:|---|---|---|";
}

/// What the load generator can learn about the server: `GET /v1/models` and the HTTP `Server`
/// header (llama.cpp's `llama-server` sends one), plus a label given by the caller.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ServerInfo {
    pub url: String,
    /// Free text from the command line (e.g. `llama-server 11434, -np 16 -t 2`).
    pub label: Option<String>,
    /// Model ids the server lists.
    pub models: Vec<String>,
    /// The `Server` response header, if any.
    pub http_server: Option<String>,
}

impl ServerInfo {
    /// Asks the server; what it doesn't answer stays empty.
    pub async fn probe(url: &str, api_key: Option<&str>, label: Option<String>) -> Self {
        let mut info = ServerInfo {
            url: url.to_string(),
            label,
            ..Default::default()
        };
        let client = reqwest::Client::new();
        let mut req = client
            .get(format!("{url}/v1/models"))
            .timeout(Duration::from_secs(10));
        if let Some(key) = api_key {
            req = req.bearer_auth(key);
        }
        let Ok(resp) = req.send().await else {
            return info;
        };
        info.http_server = resp
            .headers()
            .get(reqwest::header::SERVER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if let Ok(v) = resp.json::<Value>().await {
            if let Some(data) = v["data"].as_array() {
                info.models = data
                    .iter()
                    .filter_map(|m| m["id"].as_str().map(str::to_string))
                    .collect();
            }
        }
        info
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poisson_arrivals_have_the_rate_and_are_reproducible() {
        let a = poisson_arrivals(4000, 8.0, 7);
        assert_eq!(a, poisson_arrivals(4000, 8.0, 7));
        assert_ne!(a, poisson_arrivals(4000, 8.0, 8));
        assert_eq!(a[0], Duration::ZERO);
        assert!(a.windows(2).all(|w| w[0] <= w[1]));
        let mean_gap = a.last().unwrap().as_secs_f64() / 3999.0;
        assert!((mean_gap - 0.125).abs() < 0.01, "mean gap {mean_gap}");
        // Exponential gaps: the coefficient of variation is 1.
        let gaps: Vec<f64> = a.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).collect();
        let var = gaps.iter().map(|g| (g - mean_gap).powi(2)).sum::<f64>() / gaps.len() as f64;
        let cv = var.sqrt() / mean_gap;
        assert!((cv - 1.0).abs() < 0.1, "coefficient of variation {cv}");
    }

    #[test]
    fn prompts_have_their_length_and_differ() {
        assert_eq!(prompt(3, 17).split(' ').count(), 17);
        assert_eq!(prompt(3, 17), prompt(3, 17));
        assert_ne!(prompt(3, 17), prompt(4, 17));
        assert_eq!(prompt(0, 0), "");
    }

    #[test]
    fn summary_counts_only_completed_requests() {
        let cfg = LoadConfig {
            url: "http://x".into(),
            model: "m".into(),
            api_key: None,
            num_requests: 3,
            arrival: Arrival::Poisson {
                rate: 2.0,
                max_concurrency: Some(4),
                seed: 0,
            },
            shapes: crate::lengths::synthetic(&[8], 3),
            first_request: 0,
        };
        let ok = RequestResult {
            ttft: Duration::from_millis(100),
            e2e: Duration::from_millis(300),
            itl: vec![Duration::from_millis(100); 2],
            num_chunks: 3,
            completion_tokens: 3,
            prompt_tokens: 8,
            ..Default::default()
        };
        let failed = RequestResult {
            error: Some("HTTP 500".into()),
            ..Default::default()
        };
        let r = summarize(&cfg, &[ok.clone(), failed.clone(), failed], 2.0);
        assert_eq!((r.errors, r.completion_tokens, r.prompt_tokens), (2, 3, 8));
        assert_eq!(r.error_samples, vec!["HTTP 500".to_string()]);
        assert_eq!((r.concurrency, r.request_rate), (Some(4), Some(2.0)));
        assert_eq!(r.req_per_s, 0.5);
        assert_eq!(r.total_tok_per_s, 5.5);
        assert!((r.tpot_ms.p50 - 100.0).abs() < 1e-9);
        assert_eq!(r.load(), "2.00 req/s, c<=4");
    }
}
