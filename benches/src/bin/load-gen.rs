//! `load-gen`: streamed completions against any OpenAI-compatible server at one or more fixed
//! concurrencies; prints a table and optionally writes JSON.
//!
//!   load-gen --url http://127.0.0.1:8000 --model SmolLM2-135M-Instruct --concurrency 1 4 8
use clap::Parser;
use pagoda_benches::loadgen::{run, LoadConfig, LoadReport};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    #[arg(long, default_value = "SmolLM2-135M-Instruct")]
    model: String,
    #[arg(long, env = "PAGODA_API_KEY")]
    api_key: Option<String>,
    #[arg(long, num_args = 1.., default_values_t = [1usize, 4, 8])]
    concurrency: Vec<usize>,
    /// Requests per concurrency level.
    #[arg(long, default_value_t = 32)]
    num_requests: usize,
    /// Prompt lengths in words, cycled (a fixed synthetic distribution).
    #[arg(long, num_args = 1.., default_values_t = [32usize, 64, 128, 256])]
    prompt_words: Vec<usize>,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let machine = pagoda_benches::MachineInfo::detect();
    println!(
        "server {} model {}; client on {} ({} cores)",
        args.url, args.model, machine.cpu_model, machine.num_cores
    );
    println!("{}", LoadReport::TABLE_HEADER);
    let mut reports = Vec::new();
    for &concurrency in &args.concurrency {
        let cfg = LoadConfig {
            url: args.url.clone(),
            model: args.model.clone(),
            api_key: args.api_key.clone(),
            num_requests: args.num_requests,
            concurrency,
            prompt_words: args.prompt_words.clone(),
            max_tokens: args.max_tokens,
        };
        let report = run(&cfg).await?;
        println!("{}", report.table_row());
        reports.push(report);
    }
    if let Some(path) = args.json {
        let out = serde_json::json!({"machine": machine.cpu_model, "num_cores": machine.num_cores, "model": args.model, "runs": reports});
        std::fs::write(path, serde_json::to_string_pretty(&out)?)?;
    }
    Ok(())
}
