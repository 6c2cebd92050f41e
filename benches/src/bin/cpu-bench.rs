//! CPU benchmark of the engine core: prefill throughput, single-stream decode and batched
//! decode, driving the synchronous [`Engine`] directly (no engine thread, channels or HTTP), so
//! the clock sees only schedule → execute → update.
//!
//! ```text
//! cargo run --release -p pagoda-benches --bin cpu-bench -- [--dequantize] [--json out.json]
//! ```
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use pagoda_benches::{load_average, median, peak_rss_bytes, process_cpu_time, MachineInfo};
use pagoda_engine::request::Request;
use pagoda_engine::scheduler::RequestOutput;
use pagoda_engine::{Engine, EngineConfig, RequestId, SamplingParams, SchedulerConfig};
use pagoda_models::LoadOptions;

/// Prompt text; repeated and cut to `--prompt-len` tokens.
const PARAGRAPH: &str = "The old lighthouse stood at the edge of the cliff, its white paint \
    peeling after decades of salt wind. Every evening the keeper climbed the spiral stairs, \
    trimmed the wick and wound the clockwork that turned the great lens. Ships far out at sea \
    counted the flashes to learn which stretch of coast they were passing, and fishermen in \
    the harbour below set their watches by the first beam of the night.";

/// Token offset between the prompts of concurrent sequences, so that no two are the same.
const PROMPT_STRIDE: usize = 13;

const BLOCK_SIZE: usize = 16;

#[derive(Parser, Debug)]
#[command(about = "Prefill and decode throughput of the engine core on the CPU")]
struct Args {
    /// A `.gguf` file or Hugging Face folder; `default` is the default model in the cache.
    #[arg(long)]
    model: Option<String>,
    /// Prompt tokens per request.
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Tokens generated per request in the decode runs (EOS ignored).
    #[arg(long, default_value_t = 128)]
    gen_len: usize,
    /// Concurrent sequences in the batched decode run.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Dequantize quantized GGUF weights to f32 at load (float matmuls).
    #[arg(long)]
    dequantize: bool,
    /// Timed prefill runs (the median is reported).
    #[arg(long, default_value_t = 5)]
    prefill_runs: usize,
    /// Timed single-stream decode runs (the median is reported).
    #[arg(long, default_value_t = 3)]
    decode_runs: usize,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The engine plus request ids, with the step loop the measurements share.
struct Bench {
    engine: Engine,
    max_context_len: usize,
    next_id: u64,
}

impl Bench {
    fn add(&mut self, prompt: Vec<u32>, max_tokens: usize) -> RequestId {
        let id = RequestId(self.next_id);
        self.next_id += 1;
        let params = SamplingParams {
            max_tokens,
            ignore_eos: true,
            ..Default::default()
        };
        self.engine
            .add(Request::new(id, prompt, params, self.max_context_len));
        id
    }

    fn step(&mut self) -> Result<Vec<RequestOutput>> {
        self.engine
            .step()
            .map_err(|(_, e)| anyhow::Error::from(e).context("engine step"))
    }
}

/// One prefill: a prompt with `max_tokens` 1, scheduled in one step.
struct PrefillRun {
    elapsed: Duration,
    num_steps: usize,
}

fn prefill_once(bench: &mut Bench, prompt: &[u32]) -> Result<PrefillRun> {
    bench.add(prompt.to_vec(), 1);
    let start = Instant::now();
    let mut num_steps = 0;
    while bench.engine.has_work() {
        bench.step()?;
        num_steps += 1;
    }
    Ok(PrefillRun {
        elapsed: start.elapsed(),
        num_steps,
    })
}

/// A decode run over `prompts.len()` sequences. The decode phase starts when every sequence
/// has its first token (prefill done) and ends with the last token.
struct DecodeRun {
    /// From adding the requests to the last sequence's first token.
    time_to_first_tokens: Duration,
    decode_time: Duration,
    /// Tokens produced inside the decode phase (first tokens excluded).
    num_decode_tokens: usize,
    num_decode_steps: usize,
    num_generated: usize,
}

impl DecodeRun {
    fn tok_per_s(&self) -> f64 {
        self.num_decode_tokens as f64 / self.decode_time.as_secs_f64()
    }
}

fn decode_once(bench: &mut Bench, prompts: &[Vec<u32>], gen_len: usize) -> Result<DecodeRun> {
    let ids: Vec<RequestId> = prompts
        .iter()
        .map(|p| bench.add(p.clone(), gen_len))
        .collect();
    let start = Instant::now();
    let mut started = std::collections::HashSet::new();
    let mut decode_start: Option<Instant> = None;
    let (mut num_decode_tokens, mut num_decode_steps, mut num_generated) = (0, 0, 0);
    while bench.engine.has_work() {
        let outputs = bench.step()?;
        num_generated += outputs.len();
        if decode_start.is_some() {
            num_decode_tokens += outputs.len();
            num_decode_steps += 1;
        } else {
            started.extend(outputs.iter().map(|o| o.id));
            if started.len() == ids.len() {
                decode_start = Some(Instant::now());
            }
        }
    }
    let end = Instant::now();
    let decode_start = decode_start.context("a sequence never produced a token")?;
    Ok(DecodeRun {
        time_to_first_tokens: decode_start - start,
        decode_time: end - decode_start,
        num_decode_tokens,
        num_decode_steps,
        num_generated,
    })
}

/// `num_tokens` ids cut from the paragraph repeated, starting `offset` tokens in.
fn prompt_tokens(paragraph_ids: &[u32], offset: usize, num_tokens: usize) -> Vec<u32> {
    paragraph_ids
        .iter()
        .copied()
        .cycle()
        .skip(offset)
        .take(num_tokens)
        .collect()
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        args.prompt_len > 0 && args.gen_len > 1 && args.concurrency > 0,
        "--prompt-len and --concurrency must be at least 1, --gen-len at least 2"
    );
    ensure!(
        args.prefill_runs > 0 && args.decode_runs > 0,
        "run counts must be positive"
    );
    let machine = MachineInfo::detect();
    let path = pagoda_models::resolve_model_path(args.model.as_deref())?;
    let opts = LoadOptions {
        dequantize: args.dequantize,
        ..Default::default()
    };
    let load_start = Instant::now();
    let loaded =
        pagoda_models::load(&path, &opts).with_context(|| format!("loading {}", path.display()))?;
    let load_time = load_start.elapsed();

    let paragraph_ids = loaded.tokenizer.encode(PARAGRAPH, false)?;
    ensure!(
        !paragraph_ids.is_empty(),
        "the paragraph tokenized to nothing"
    );
    let max_context_len = loaded.model.max_context_len();
    if args.prompt_len + args.gen_len > max_context_len {
        bail!(
            "prompt + generation ({}) exceed the model's context ({max_context_len})",
            args.prompt_len + args.gen_len
        );
    }

    // Room for every sequence of the batched run; the whole batch prefills in one step.
    let blocks_per_seq = (args.prompt_len + args.gen_len).div_ceil(BLOCK_SIZE);
    let num_blocks = args.concurrency * blocks_per_seq + 1;
    let config = EngineConfig {
        scheduler: SchedulerConfig {
            max_num_batched_tokens: args.prompt_len * args.concurrency,
            max_num_seqs: args.concurrency,
        },
        block_size: BLOCK_SIZE,
        num_blocks: Some(num_blocks),
        ..Default::default()
    };
    let kv_bytes = loaded.model.kv_cache_spec().bytes_per_block(BLOCK_SIZE) * num_blocks;
    let engine = Engine::new(
        loaded.model,
        &config,
        loaded.tokenizer.eos_token_ids.clone(),
    )?;
    let mut bench = Bench {
        engine,
        max_context_len,
        next_id: 1,
    };

    // Warm-up: one prefill and a few decode steps, untimed.
    let prompt = prompt_tokens(&paragraph_ids, 0, args.prompt_len);
    decode_once(&mut bench, std::slice::from_ref(&prompt), 4)?;

    let load_before = load_average();
    let cpu_before = process_cpu_time();
    let timed_start = Instant::now();
    let mut prefill = Vec::with_capacity(args.prefill_runs);
    for _ in 0..args.prefill_runs {
        let run = prefill_once(&mut bench, &prompt)?;
        ensure!(
            run.num_steps == 1,
            "prefill took {} steps (expected one)",
            run.num_steps
        );
        prefill.push(run);
    }
    let prefill_tps: Vec<f64> = prefill
        .iter()
        .map(|r| args.prompt_len as f64 / r.elapsed.as_secs_f64())
        .collect();
    let prefill_ms: Vec<f64> = prefill
        .iter()
        .map(|r| r.elapsed.as_secs_f64() * 1e3)
        .collect();

    let mut single = Vec::with_capacity(args.decode_runs);
    for _ in 0..args.decode_runs {
        let run = decode_once(&mut bench, std::slice::from_ref(&prompt), args.gen_len)?;
        ensure!(
            run.num_generated == args.gen_len,
            "generated {} tokens, wanted {}",
            run.num_generated,
            args.gen_len
        );
        single.push(run);
    }
    let single_tps: Vec<f64> = single.iter().map(DecodeRun::tok_per_s).collect();
    let single_ttft_ms: Vec<f64> = single
        .iter()
        .map(|r| r.time_to_first_tokens.as_secs_f64() * 1e3)
        .collect();

    let prompts: Vec<Vec<u32>> = (0..args.concurrency)
        .map(|i| prompt_tokens(&paragraph_ids, i * PROMPT_STRIDE, args.prompt_len))
        .collect();
    let batched = decode_once(&mut bench, &prompts, args.gen_len)?;
    ensure!(
        batched.num_generated == args.gen_len * args.concurrency,
        "batched run generated {} tokens, wanted {}",
        batched.num_generated,
        args.gen_len * args.concurrency
    );
    ensure!(
        bench.engine.stats().num_preemptions == 0,
        "the KV pool was too small: requests were preempted"
    );
    let timed_wall = timed_start.elapsed();
    let load_after = load_average();
    // Share of all cores this process kept busy during the timed runs.
    let cpu_share = match (cpu_before, process_cpu_time()) {
        (Some(a), Some(b)) => {
            Some((b - a).as_secs_f64() / (timed_wall.as_secs_f64() * machine.num_cores as f64))
        }
        _ => None,
    };
    let peak_rss = peak_rss_bytes();

    let weights = if args.dequantize {
        "GGUF dequantized to f32 at load"
    } else {
        "quantized as stored in the GGUF"
    };
    let model_name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into(),
    );
    let batched_step_ms =
        batched.decode_time.as_secs_f64() * 1e3 / batched.num_decode_steps.max(1) as f64;
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;

    println!(
        "machine: {} ({} cores; rayon threads {}, candle threads {})",
        machine.cpu_model, machine.num_cores, machine.num_rayon_threads, machine.num_candle_threads
    );
    println!("model:   {model_name} ({weights}; f32 activations and KV cache)");
    println!(
        "setup:   prompt {} tokens, gen {} tokens, concurrency {}, KV pool {} blocks x {} ({:.1} MiB), load {:.2} s",
        args.prompt_len,
        args.gen_len,
        args.concurrency,
        num_blocks,
        BLOCK_SIZE,
        mib(kv_bytes as u64),
        load_time.as_secs_f64()
    );
    let fmt_load = |l: Option<[f64; 3]>| l.map_or("n/a".to_string(), |l| format!("{:.2}", l[0]));
    println!(
        "load:    1-min load average {} before, {} after the timed runs; this process used {} of the {} cores over {:.1} s",
        fmt_load(load_before),
        fmt_load(load_after),
        cpu_share.map_or("n/a".to_string(), |s| format!("{:.0}%", s * 100.0)),
        machine.num_cores,
        timed_wall.as_secs_f64()
    );
    println!();
    println!("| metric | value | detail |");
    println!("|---|---:|---|");
    println!(
        "| prefill | {:.1} tok/s | {} tokens in one step, {:.1} ms; median of {} |",
        median(&prefill_tps),
        args.prompt_len,
        median(&prefill_ms),
        args.prefill_runs
    );
    println!(
        "| decode, 1 stream | {:.1} tok/s | {} tokens after the first; median of {}; TTFT {:.1} ms |",
        median(&single_tps),
        args.gen_len - 1,
        args.decode_runs,
        median(&single_ttft_ms)
    );
    println!(
        "| decode, {} streams | {:.1} tok/s | aggregate; {} tokens in {:.2} s, {:.1} ms per step; one run |",
        args.concurrency,
        batched.tok_per_s(),
        batched.num_decode_tokens,
        batched.decode_time.as_secs_f64(),
        batched_step_ms
    );
    match peak_rss {
        Some(b) => println!("| peak RSS | {:.1} MiB | VmHWM, whole process |", mib(b)),
        None => println!("| peak RSS | n/a | no /proc/self/status |"),
    }

    if let Some(json_path) = &args.json {
        let report = serde_json::json!({
            "machine": {
                "cpu_model": machine.cpu_model,
                "num_cores": machine.num_cores,
                "num_rayon_threads": machine.num_rayon_threads,
                "num_candle_threads": machine.num_candle_threads,
            },
            "model": path.display().to_string(),
            "dequantize": args.dequantize,
            "prompt_len": args.prompt_len,
            "gen_len": args.gen_len,
            "concurrency": args.concurrency,
            "kv_num_blocks": num_blocks,
            "kv_block_size": BLOCK_SIZE,
            "load_s": load_time.as_secs_f64(),
            "prefill": {
                "tok_per_s_median": median(&prefill_tps),
                "tok_per_s_runs": prefill_tps,
                "ms_runs": prefill_ms,
            },
            "decode_single": {
                "tok_per_s_median": median(&single_tps),
                "tok_per_s_runs": single_tps,
                "ttft_ms_runs": single_ttft_ms,
            },
            "decode_batched": {
                "tok_per_s": batched.tok_per_s(),
                "num_decode_tokens": batched.num_decode_tokens,
                "num_decode_steps": batched.num_decode_steps,
                "decode_s": batched.decode_time.as_secs_f64(),
                "prefill_s": batched.time_to_first_tokens.as_secs_f64(),
            },
            "peak_rss_bytes": peak_rss,
            "load_average_1m_before": load_before.map(|l| l[0]),
            "load_average_1m_after": load_after.map(|l| l[0]),
            "timed_wall_s": timed_wall.as_secs_f64(),
            "cpu_share_of_all_cores": cpu_share,
        });
        std::fs::write(json_path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", json_path.display()))?;
    }
    Ok(())
}
