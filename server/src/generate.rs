//! `pagoda generate`: one prompt through the real engine, streamed to stdout.
use std::io::Write;

use anyhow::Context;
use pagoda_engine::{EngineConfig, EngineHandle, GenerateRequest, Prompt, SamplingParams};
use pagoda_models::chat_template::ChatMessage;

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// A GGUF file, a Hugging Face folder, or `default` (the default model in the cache).
    #[arg(long, default_value = "default")]
    model: String,
    #[arg(long)]
    prompt: String,
    /// Send the prompt as raw text instead of a chat message.
    #[arg(long)]
    raw: bool,
    /// A system message (chat mode).
    #[arg(long)]
    system: Option<String>,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long)]
    seed: Option<u64>,
    /// Dequantize GGUF weights to f32 at load.
    #[arg(long)]
    dequantize: bool,
    /// Where to run: `cpu`, `cuda` or `auto`.
    #[arg(long, default_value = "auto")]
    device: pagoda_kernels::DeviceChoice,
    /// `auto`, `f32`, `bf16` or `f16`.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Stop strings (repeatable).
    #[arg(long)]
    stop: Vec<String>,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let path = pagoda_models::resolve_model_path(Some(&args.model))?;
    tracing::info!(model = %path.display(), "loading");
    let opts =
        pagoda_server::serve::load_options(args.device, &args.dtype, args.dequantize, &path)?;
    let loaded =
        pagoda_models::load(&path, &opts).with_context(|| format!("loading {}", path.display()))?;
    let engine = EngineHandle::start(loaded, EngineConfig::default())?;
    let prompt = if args.raw {
        Prompt::Text(args.prompt)
    } else {
        let mut messages = Vec::new();
        if let Some(system) = args.system {
            messages.push(ChatMessage {
                role: "system".into(),
                content: system,
            });
        }
        messages.push(ChatMessage {
            role: "user".into(),
            content: args.prompt,
        });
        Prompt::Chat(messages)
    };
    let params = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
        max_tokens: args.max_tokens,
        ..Default::default()
    };
    let request = GenerateRequest {
        stop: args.stop,
        ..GenerateRequest::new(prompt, params)
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        let mut stream = engine.submit(request).await?;
        let mut stdout = std::io::stdout();
        let started = std::time::Instant::now();
        let mut first: Option<std::time::Duration> = None;
        while let Some(piece) = stream.next().await {
            let piece = piece?;
            first.get_or_insert_with(|| started.elapsed());
            write!(stdout, "{}", piece.text)?;
            stdout.flush()?;
            if let Some(reason) = piece.finish_reason {
                writeln!(stdout)?;
                let total = started.elapsed();
                let n = stream.num_generated_tokens();
                let decode = total.saturating_sub(first.unwrap_or_default());
                tracing::info!(
                    prompt_tokens = stream.num_prompt_tokens(),
                    generated_tokens = n,
                    finish_reason = reason.as_str(),
                    ttft_ms = first.unwrap_or_default().as_millis() as u64,
                    decode_tok_per_s = format!(
                        "{:.1}",
                        (n.saturating_sub(1)) as f64 / decode.as_secs_f64().max(1e-9)
                    ),
                    "done"
                );
            }
        }
        anyhow::Ok(())
    });
    engine.shutdown();
    result
}
