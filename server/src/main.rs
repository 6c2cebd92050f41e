//! `pagoda`: the serving engine's one binary.
use clap::{Parser, Subcommand};

mod bench;
mod generate;

#[derive(Parser)]
#[command(
    name = "pagoda",
    version,
    about = "An LLM serving engine: paged KV cache, continuous batching, OpenAI-compatible API"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible API.
    Serve(pagoda_server::serve::ServeArgs),
    /// Generate an answer for one prompt and print it as it streams.
    Generate(generate::GenerateArgs),
    /// Benchmarks: `pagoda bench throughput` (offline, straight into the engine).
    Bench(bench::BenchArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Serve(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(pagoda_server::serve::run(args)),
    }
}
