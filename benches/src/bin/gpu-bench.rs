//! Real shapes with random weights, made directly on the device (no model file): batch-1 decode
//! time per step and offline throughput (N requests submitted at once) through the real engine.
//!
//!   gpu-bench --shape llama3-8b --num-requests 512 --prompt-len 512 --gen-len 256
//!   gpu-bench --shape llama3-8b --lora-adapters 0 1 8 64   (offline runs with N distinct
//!                                                           random rank-16 adapters each)
//!
//! Run on the GPU machine with the CUDA build (benches/gpu/); `--device cpu` works anywhere.
use std::time::Instant;

use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use pagoda_adapters::{AdapterLimits, AdapterRegistry, LoraAdapter};
use pagoda_engine::request::{Request, RequestId};
use pagoda_engine::{Engine, EngineConfig, SamplingParams, SchedulerConfig};
use pagoda_kernels::DeviceChoice;
use pagoda_models::arch::llama::Llama;
use pagoda_models::config::LlamaConfig;
use pagoda_models::weights::random_llama_weights;
use pagoda_models::{LoraPair, LoraShapes, LoraTarget, LoraWeights, Model};

#[derive(Parser)]
struct Args {
    /// `llama3-8b` or `smollm2-135m`.
    #[arg(long, default_value = "llama3-8b")]
    shape: String,
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// Decode steps timed at batch 1.
    #[arg(long, default_value_t = 128)]
    batch1_steps: usize,
    /// Offline run: requests submitted at once (0 skips it).
    #[arg(long, default_value_t = 512)]
    num_requests: usize,
    #[arg(long, default_value_t = 512)]
    prompt_len: usize,
    #[arg(long, default_value_t = 256)]
    gen_len: usize,
    #[arg(long, default_value_t = 256)]
    max_num_seqs: usize,
    #[arg(long, default_value_t = 8192)]
    max_num_batched_tokens: usize,
    /// KV pool size in GiB.
    #[arg(long, default_value_t = 40.0)]
    kv_cache_gib: f64,
    /// Offline runs with these numbers of distinct LoRA adapters (requests take them in turn;
    /// 0 = base model), instead of the single offline run.
    #[arg(long, num_args = 1..)]
    lora_adapters: Vec<usize>,
    /// Rank of the random adapters (all seven projections of every layer).
    #[arg(long, default_value_t = 16)]
    lora_rank: usize,
}

/// A random adapter on the device: A ~ N(0, 1/in), Bᵀ ~ N(0, 0.01²), every projection.
fn random_adapter(
    shapes: &LoraShapes,
    rank: usize,
    dtype: DType,
    dev: &Device,
) -> Result<LoraWeights> {
    let mut w = LoraWeights::default();
    for _ in 0..shapes.num_layers {
        let mut layer: [Option<LoraPair>; 7] = Default::default();
        for t in LoraTarget::ALL {
            let (i, o) = shapes.features(t);
            let a =
                Tensor::randn(0f32, 1.0 / (i as f32).sqrt(), (rank, i), dev)?.to_dtype(dtype)?;
            let bt = Tensor::randn(0f32, 0.01, (rank, o), dev)?.to_dtype(dtype)?;
            layer[t.index()] = Some(LoraPair { a, bt });
        }
        w.layers.push(layer);
    }
    Ok(w)
}

/// Deterministic token ids in `[0, vocab)`.
fn tokens(seed: u64, n: usize, vocab: usize) -> Vec<u32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % vocab as u64) as u32
        })
        .collect()
}

fn main() -> Result<()> {
    let args = Args::parse();
    let cfg = match args.shape.as_str() {
        "llama3-8b" => LlamaConfig::llama3_8b(),
        "smollm2-135m" => LlamaConfig::smollm2_135m(),
        other => anyhow::bail!("unknown shape {other}"),
    };
    let device = pagoda_kernels::select_device(args.device)
        .map_err(anyhow::Error::msg)?
        .device;
    let dtype = if device.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    };
    let started = Instant::now();
    let mut weights = random_llama_weights(&cfg, dtype, &device)?;
    let model = Llama::load(cfg.clone(), &mut weights, dtype, &device)?;
    drop(weights);
    let num_params =
        (cfg.vocab_size * cfg.hidden_size * if cfg.tie_word_embeddings { 1 } else { 2 })
            + cfg.num_layers
                * (cfg.hidden_size * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
                    + 3 * cfg.hidden_size * cfg.intermediate_size);
    let weight_bytes = num_params * dtype.size_in_bytes();
    eprintln!(
        "{} on {device:?} {dtype:?}: {:.2} B params, made in {:.1}s",
        args.shape,
        num_params as f64 / 1e9,
        started.elapsed().as_secs_f64()
    );
    let max_loras = args.lora_adapters.iter().copied().max().unwrap_or(0);
    let limits = AdapterLimits {
        max_loras: max_loras.max(1),
        max_lora_rank: args.lora_rank,
        max_adapter_bytes: usize::MAX,
        ..AdapterLimits::default()
    };
    let shapes = model.lora_shapes();
    let config = EngineConfig {
        scheduler: SchedulerConfig {
            max_num_batched_tokens: args.max_num_batched_tokens,
            max_num_seqs: args.max_num_seqs,
        },
        kv_cache_memory: Some((args.kv_cache_gib * (1u64 << 30) as f64) as usize),
        lora: (max_loras > 0).then_some(limits),
        ..EngineConfig::default()
    };
    let max_context = cfg.max_position_embeddings;
    let mut engine = Engine::new(Box::new(model), &config, Vec::new())?;
    let registry = AdapterRegistry::new(shapes.clone(), limits, vec![]);
    let adapters: Vec<Arc<LoraAdapter>> = (0..max_loras)
        .map(|i| -> Result<_> {
            let name = format!("random-{i}");
            let w = random_adapter(&shapes, args.lora_rank, dtype, &device)?;
            registry.register(&name, std::path::Path::new("random"), w)?;
            Ok(registry.resolve(&name)?)
        })
        .collect::<Result<_>>()?;
    let mut next_id = 0u64;
    let mut add = |engine: &mut Engine,
                   prompt: Vec<u32>,
                   max_tokens: usize,
                   adapter: Option<&Arc<LoraAdapter>>| {
        next_id += 1;
        let params = SamplingParams {
            max_tokens,
            ignore_eos: true,
            ..Default::default()
        };
        let mut r = Request::new(RequestId(next_id), prompt, params, max_context);
        r.adapter = adapter.cloned();
        engine.add(r);
    };
    let step = |engine: &mut Engine| {
        engine
            .step()
            .map_err(|(_, e)| anyhow::Error::from(e))
            .context("step")
    };

    // Warm-up (kernel loading, cuBLAS handles).
    add(
        &mut engine,
        tokens(1, 16, cfg.vocab_size),
        4,
        adapters.first(),
    );
    while engine.has_work() {
        step(&mut engine)?;
    }

    // Batch 1: prefill 128 tokens, then time each decode step.
    add(
        &mut engine,
        tokens(2, 128, cfg.vocab_size),
        args.batch1_steps + 1,
        None,
    );
    step(&mut engine)?;
    let t = Instant::now();
    let mut num_steps = 0;
    while engine.has_work() {
        step(&mut engine)?;
        num_steps += 1;
    }
    let ms_per_step = t.elapsed().as_secs_f64() * 1e3 / num_steps as f64;
    println!(
        "| {} | batch-1 decode | {ms_per_step:.2} ms/step | {:.1} tok/s | weights {:.2} GB |",
        args.shape,
        1e3 / ms_per_step,
        weight_bytes as f64 / 1e9
    );

    let runs: Vec<Option<usize>> = if args.lora_adapters.is_empty() {
        vec![None]
    } else {
        args.lora_adapters.iter().map(|&n| Some(n)).collect()
    };
    for num_adapters in runs.into_iter().filter(|_| args.num_requests > 0) {
        let n = num_adapters.unwrap_or(0);
        for i in 0..args.num_requests {
            add(
                &mut engine,
                tokens(100 + i as u64, args.prompt_len, cfg.vocab_size),
                args.gen_len,
                (n > 0).then(|| &adapters[i % n]),
            );
        }
        let loads_before = engine.stats().num_lora_slot_loads;
        let t = Instant::now();
        let mut num_out = 0;
        let mut num_steps = 0;
        while engine.has_work() {
            num_out += step(&mut engine)?.len();
            num_steps += 1;
        }
        let secs = t.elapsed().as_secs_f64();
        let stats = engine.stats();
        let lora = num_adapters.map_or(String::new(), |n| {
            format!(
                ", {n} adapters r{} ({} slot loads)",
                args.lora_rank,
                stats.num_lora_slot_loads - loads_before
            )
        });
        println!(
            "| {} | offline {} x ({} in, {} out){lora} | {:.1} s, {num_steps} steps | {:.0} output tok/s | {} preemptions, {} KV blocks |",
            args.shape,
            args.num_requests,
            args.prompt_len,
            args.gen_len,
            secs,
            num_out as f64 / secs,
            stats.num_preemptions,
            stats.num_blocks
        );
    }
    Ok(())
}
