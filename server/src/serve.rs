//! `pagoda serve`: bind first (so `/health` answers 503 while loading), load and warm the model
//! in the background, serve until SIGINT/SIGTERM, then drain for a grace period and stop.
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use std::future::IntoFuture;

use anyhow::Context;
use pagoda_adapters::AdapterLimits;
use pagoda_engine::{EngineConfig, EngineHandle, SchedulerConfig};
use pagoda_kernels::DeviceChoice;
use pagoda_models::LoadOptions;

use crate::app::{router, AdminConfig, AppState};

#[derive(clap::Args, Clone, Debug)]
pub struct ServeArgs {
    /// A GGUF file, a Hugging Face folder, or `default` (the default model in the cache).
    #[arg(long, default_value = "default")]
    pub model: String,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// The name clients put in `model` (default: the model's file or folder name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Requests allowed to wait beyond those running; more get 429.
    #[arg(long, default_value_t = 256)]
    pub max_waiting: usize,
    /// Require `Authorization: Bearer KEY` on the API.
    #[arg(long, env = "PAGODA_API_KEY")]
    pub api_key: Option<String>,
    /// Seconds to let in-flight requests finish after SIGINT/SIGTERM.
    #[arg(long, default_value_t = 30)]
    pub shutdown_timeout: u64,
    /// Serve LoRA adapters (implied by --lora and --lora-dir).
    #[arg(long)]
    pub enable_lora: bool,
    /// A LoRA adapter (PEFT folder) to load at start, as NAME=PATH; repeatable.
    #[arg(long = "lora", value_name = "NAME=PATH", value_parser = parse_lora)]
    pub loras: Vec<(String, std::path::PathBuf)>,
    /// Directory that runtime adapter loads (`POST /v1/load_lora_adapter`) must stay inside.
    #[arg(long)]
    pub lora_dir: Option<std::path::PathBuf>,
    /// Most distinct adapters in one step (device slots).
    #[arg(long, default_value_t = 4)]
    pub max_loras: usize,
    /// Highest adapter rank accepted (sizes the device slots).
    #[arg(long, default_value_t = 16)]
    pub max_lora_rank: usize,
    /// Most adapters registered at once.
    #[arg(long, default_value_t = 128)]
    pub max_adapters: usize,
    /// Most bytes of registered adapters' weights in host memory.
    #[arg(long, default_value_t = 4 << 30)]
    pub max_adapter_memory: usize,
    /// Token the admin endpoints require (`Authorization: Bearer ...`); without it they take
    /// the API key.
    #[arg(long, env = "PAGODA_ADMIN_TOKEN")]
    pub admin_token: Option<String>,
}

/// How the model is loaded and the engine sized: shared by `pagoda serve` and `pagoda bench`.
#[derive(clap::Args, Clone, Debug)]
pub struct EngineArgs {
    /// Most requests computed together.
    #[arg(long, default_value_t = 64)]
    pub max_num_seqs: usize,
    /// Most tokens computed in one step (prompt chunks + decodes).
    #[arg(long, default_value_t = 512)]
    pub max_num_batched_tokens: usize,
    /// KV pool size in blocks (wins over --kv-cache-memory).
    #[arg(long)]
    pub num_blocks: Option<usize>,
    /// KV pool size in bytes.
    #[arg(long)]
    pub kv_cache_memory: Option<usize>,
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// On a GPU, without --num-blocks/--kv-cache-memory: the share of the card's memory to fill
    /// (weights, activations and the KV pool).
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,
    /// Dequantize GGUF weights to f32 at load.
    #[arg(long)]
    pub dequantize: bool,
    /// Where to run: `cpu`, `cuda`, or `auto` (CUDA when compiled in and a GPU answers).
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// Activation and KV-cache type: `auto` (f32 on CPU; bf16 on CUDA, f32 for quantized GGUF), `f32`, `bf16`, `f16`.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
}

impl EngineArgs {
    /// The engine's sizes (LoRA off; `pagoda serve` adds it).
    pub fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            scheduler: SchedulerConfig {
                max_num_batched_tokens: self.max_num_batched_tokens,
                max_num_seqs: self.max_num_seqs,
            },
            block_size: self.block_size,
            num_blocks: self.num_blocks,
            kv_cache_memory: self.kv_cache_memory,
            gpu_memory_utilization: self.gpu_memory_utilization,
            ..EngineConfig::default()
        }
    }

    pub fn load_options(&self, model: &std::path::Path) -> anyhow::Result<LoadOptions> {
        load_options(self.device, &self.dtype, self.dequantize, model)
    }
}

fn parse_lora(s: &str) -> Result<(String, std::path::PathBuf), String> {
    match s.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => {
            Ok((name.to_string(), path.into()))
        }
        _ => Err(format!("expected NAME=PATH, got {s:?}")),
    }
}

/// Device and float type for a model, logging when `auto` falls back to the CPU.
pub fn load_options(
    device: DeviceChoice,
    dtype: &str,
    dequantize: bool,
    model: &std::path::Path,
) -> anyhow::Result<LoadOptions> {
    let selected = pagoda_kernels::select_device(device).map_err(anyhow::Error::msg)?;
    if let Some(why) = &selected.fallback_reason {
        tracing::info!("running on the CPU: {why}");
    }
    let quantized_gguf = model.is_file() && !dequantize;
    let dtype = match dtype {
        "auto" if selected.device.is_cuda() && !quantized_gguf => candle_core::DType::BF16,
        "auto" | "f32" => candle_core::DType::F32,
        "bf16" => candle_core::DType::BF16,
        "f16" => candle_core::DType::F16,
        other => anyhow::bail!("unknown --dtype {other:?} (auto, f32, bf16, f16)"),
    };
    tracing::info!(device = ?selected.device, ?dtype, "device");
    Ok(LoadOptions {
        device: selected.device,
        dtype,
        dequantize,
    })
}

fn served_name(args: &ServeArgs, path: &std::path::Path) -> String {
    if let Some(n) = &args.served_model_name {
        return n.clone();
    }
    let stem = if path.is_dir() {
        path.file_name()
    } else {
        path.file_stem()
    };
    let stem = stem
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    // "SmolLM2-135M-Instruct.Q4_1" -> "SmolLM2-135M-Instruct"
    match stem.rsplit_once('.') {
        Some((base, quant))
            if quant.starts_with(['Q', 'q', 'F', 'f', 'B', 'b', 'I']) && !base.is_empty() =>
        {
            base.to_string()
        }
        _ => stem,
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let path = pagoda_models::resolve_model_path(Some(&args.model))?;
    let admin = AdminConfig {
        lora_dir: args.lora_dir.clone(),
        admin_token: args.admin_token.clone(),
    };
    let state = AppState::new(served_name(&args, &path), args.api_key.clone(), admin);
    let addr: SocketAddr = format!("{}:{}", args.host, args.port)
        .parse()
        .context("invalid --host/--port")?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    tracing::info!(address = %listener.local_addr()?, "listening (the model is loading; /health says 503 until it is ready)");

    let config = EngineConfig {
        max_waiting: args.max_waiting,
        lora: (args.enable_lora || !args.loras.is_empty() || args.lora_dir.is_some()).then_some(
            AdapterLimits {
                max_loras: args.max_loras,
                max_lora_rank: args.max_lora_rank,
                max_adapters: args.max_adapters,
                max_adapter_bytes: args.max_adapter_memory,
            },
        ),
        ..args.engine.engine_config()
    };
    let loras = args.loras.clone();
    let loader_state = state.clone();
    let opts = args.engine.load_options(&path)?;
    let loading = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        let loaded = pagoda_models::load(&path, &opts)
            .with_context(|| format!("loading {}", path.display()))?;
        let c = &loaded.config;
        tracing::info!(
            model = %path.display(),
            architecture = %c.architecture,
            layers = c.num_layers,
            hidden = c.hidden_size,
            vocab = c.vocab_size,
            context = c.max_position_embeddings,
            "model loaded"
        );
        let engine = EngineHandle::start(loaded, config)?;
        if let Some(registry) = engine.adapters() {
            for (name, dir) in &loras {
                anyhow::ensure!(
                    name != &loader_state.served_model_name,
                    "--lora {name}=...: `{name}` is the base model's name"
                );
                let a = registry
                    .load(name, dir)
                    .with_context(|| format!("--lora {name}={}", dir.display()))?;
                tracing::info!(name = %a.name, path = %a.path.display(), rank = a.rank, "LoRA adapter loaded");
            }
        }
        let info = engine.info();
        tracing::info!(
            served_model_name = %loader_state.served_model_name,
            kv_blocks = info.num_blocks,
            kv_tokens = info.num_blocks * info.block_size,
            block_size = info.block_size,
            secs = format!("{:.1}", started.elapsed().as_secs_f64()),
            "ready"
        );
        let _ = loader_state.engine.set(engine);
        Ok(())
    });

    let shutdown = Arc::new(tokio::sync::Notify::new());
    let app = router(state.clone());
    let notify = shutdown.clone();
    let signal_state = state.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown_signal().await;
        tracing::info!("shutting down: no new requests; draining in-flight ones");
        signal_state.shutting_down.store(true, Ordering::Relaxed);
        notify.notify_one();
    });
    let grace = Duration::from_secs(args.shutdown_timeout);
    let grace_over = async {
        shutdown.notified().await;
        tokio::time::sleep(grace).await;
    };
    let mut server = std::pin::pin!(server.into_future());
    let mut grace_over = std::pin::pin!(grace_over);
    let mut loading = loading;
    let mut loaded = false;
    let result = loop {
        tokio::select! {
            r = &mut server => break r.map_err(anyhow::Error::from),
            r = &mut loading, if !loaded => {
                loaded = true;
                match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => break Err(e),
                    Err(e) => break Err(anyhow::anyhow!("model loading failed: {e}")),
                }
            }
            _ = &mut grace_over => {
                tracing::warn!("grace period over; aborting what is still running");
                break Ok(());
            }
        }
    };
    if let Some(engine) = state.engine.get() {
        engine.shutdown();
    }
    result
}
