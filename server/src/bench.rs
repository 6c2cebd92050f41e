//! `pagoda bench throughput`: offline throughput. N synthetic prompts are submitted at once to
//! the engine itself (the synchronous `Engine`: no HTTP, no engine thread, no detokenization),
//! which runs until every request has its `--output-len` tokens (EOS ignored). Reports
//! requests/s, output tok/s and total (prompt + output) tok/s over the wall time from the first
//! submission to the last token — the number comparable with published offline results (e.g.
//! vLLM's `benchmark_throughput` on its random dataset).
//!
//! The model is loaded as `pagoda serve` loads it (same `--model`, `--device`, `--dtype`,
//! `--dequantize`), and the engine takes the same sizes (`--max-num-seqs`,
//! `--max-num-batched-tokens`, KV pool options) with the same defaults.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use pagoda_engine::request::Request;
use pagoda_engine::{Engine, RequestId, SamplingParams};
use pagoda_server::serve::EngineArgs;

#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: BenchCommand,
}

#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// Offline throughput: N synthetic prompts submitted at once to the engine, no HTTP.
    Throughput(ThroughputArgs),
}

#[derive(clap::Args, Debug)]
pub struct ThroughputArgs {
    /// A GGUF file, a Hugging Face folder, or `default` (the default model in the cache).
    #[arg(long, default_value = "default")]
    pub model: String,
    /// Requests, all submitted at once.
    #[arg(long, default_value_t = 64)]
    pub num_prompts: usize,
    /// Prompt tokens per request (random ids from the vocabulary, seeded).
    #[arg(long, default_value_t = 128)]
    pub input_len: usize,
    /// Output tokens per request (EOS is ignored, so every request generates exactly this many).
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,
    /// Seed of the prompt token ids.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Model loading and engine sizes, as `pagoda serve` takes them.
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// What one run measured.
#[derive(Debug, serde::Serialize)]
pub struct ThroughputReport {
    pub model: String,
    pub device: String,
    pub dtype: String,
    pub num_prompts: usize,
    pub input_len: usize,
    pub output_len: usize,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    pub elapsed_s: f64,
    pub requests_per_s: f64,
    pub output_tok_per_s: f64,
    pub total_tok_per_s: f64,
    pub num_prompt_tokens: usize,
    pub num_output_tokens: usize,
    pub num_steps: usize,
    pub num_preemptions: u64,
    pub cpu_model: String,
    pub num_cores: usize,
}

pub fn run(args: BenchArgs) -> Result<()> {
    match args.command {
        BenchCommand::Throughput(args) => {
            let report = throughput(&args)?;
            println!(
                "{} on {} ({}): {} prompts × ({} in, {} out), max_num_seqs {}, max_num_batched_tokens {}, {} KV blocks of {}",
                report.model,
                report.device,
                report.dtype,
                report.num_prompts,
                report.input_len,
                report.output_len,
                report.max_num_seqs,
                report.max_num_batched_tokens,
                report.num_blocks,
                report.block_size
            );
            println!(
                "Throughput: {:.2} requests/s, {:.1} total tok/s, {:.1} output tok/s ({:.2} s, {} steps, {} preemptions; {}, {} cores)",
                report.requests_per_s,
                report.total_tok_per_s,
                report.output_tok_per_s,
                report.elapsed_s,
                report.num_steps,
                report.num_preemptions,
                report.cpu_model,
                report.num_cores
            );
            if let Some(path) = &args.json {
                std::fs::write(path, serde_json::to_string_pretty(&report)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(())
        }
    }
}

/// Loads the model, warms the engine up with one short request, then times the batch.
pub fn throughput(args: &ThroughputArgs) -> Result<ThroughputReport> {
    ensure!(
        args.num_prompts > 0 && args.input_len > 0 && args.output_len > 0,
        "--num-prompts, --input-len and --output-len must be at least 1"
    );
    let path = pagoda_models::resolve_model_path(Some(&args.model))?;
    let opts = args.engine.load_options(&path)?;
    let device = if opts.device.is_cuda() { "cuda" } else { "cpu" };
    let dtype = format!("{:?}", opts.dtype).to_lowercase();
    let loaded =
        pagoda_models::load(&path, &opts).with_context(|| format!("loading {}", path.display()))?;
    let max_context_len = loaded.model.max_context_len();
    ensure!(
        args.input_len + args.output_len <= max_context_len,
        "--input-len + --output-len ({}) exceed the model's context ({max_context_len})",
        args.input_len + args.output_len
    );
    let vocab = loaded.tokenizer.vocab_size().min(loaded.config.vocab_size) as u64;
    let eos = loaded.tokenizer.eos_token_ids.clone();
    let config = args.engine.engine_config();
    let mut engine = Engine::new(loaded.model, &config, eos.clone())?;
    let stats = engine.stats();

    // Prompts: random ordinary token ids (never an end-of-sequence id), fixed by the seed.
    let mut state = args.seed;
    let mut random_prompt = |len: usize| -> Vec<u32> {
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let id = (mix64(state) % vocab) as u32;
            if !eos.contains(&id) {
                out.push(id);
            }
        }
        out
    };
    let params = |max_tokens| SamplingParams {
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    };
    let step = |engine: &mut Engine| {
        engine
            .step()
            .map_err(|(_, e)| anyhow::Error::from(e).context("engine step"))
    };

    // Warm-up (untimed): one short request.
    let warm = random_prompt(args.input_len.min(16));
    engine.add(Request::new(RequestId(0), warm, params(4), max_context_len));
    while engine.has_work() {
        step(&mut engine)?;
    }
    let preemptions_before = engine.stats().num_preemptions;

    let prompts: Vec<Vec<u32>> = (0..args.num_prompts)
        .map(|_| random_prompt(args.input_len))
        .collect();
    let start = Instant::now();
    for (i, prompt) in prompts.into_iter().enumerate() {
        let id = RequestId(i as u64 + 1);
        engine.add(Request::new(
            id,
            prompt,
            params(args.output_len),
            max_context_len,
        ));
    }
    let (mut num_steps, mut num_output_tokens, mut num_finished) = (0, 0, 0);
    while engine.has_work() {
        let outputs = step(&mut engine)?;
        num_steps += 1;
        num_output_tokens += outputs.len();
        num_finished += outputs.iter().filter(|o| o.finish.is_some()).count();
    }
    let elapsed = start.elapsed().as_secs_f64();
    ensure!(
        num_finished == args.num_prompts && num_output_tokens == args.num_prompts * args.output_len,
        "{num_finished} of {} requests finished with {num_output_tokens} tokens",
        args.num_prompts
    );
    let num_prompt_tokens = args.num_prompts * args.input_len;
    Ok(ThroughputReport {
        model: loaded.name,
        device: device.into(),
        dtype,
        num_prompts: args.num_prompts,
        input_len: args.input_len,
        output_len: args.output_len,
        max_num_seqs: args.engine.max_num_seqs,
        max_num_batched_tokens: args.engine.max_num_batched_tokens,
        num_blocks: stats.num_blocks,
        block_size: stats.block_size,
        elapsed_s: elapsed,
        requests_per_s: args.num_prompts as f64 / elapsed,
        output_tok_per_s: num_output_tokens as f64 / elapsed,
        total_tok_per_s: (num_prompt_tokens + num_output_tokens) as f64 / elapsed,
        num_prompt_tokens,
        num_output_tokens,
        num_steps,
        num_preemptions: engine.stats().num_preemptions - preemptions_before,
        cpu_model: pagoda_kernels::device::cpu_model(),
        num_cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
    })
}

/// SplitMix64's output function.
fn mix64(x: u64) -> u64 {
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
