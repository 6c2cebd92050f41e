//! `pagoda bench throughput` on the real default model with tiny counts: every request runs to
//! its output length, and the report's numbers add up.
use std::process::Command;

use serde_json::Value;

#[test]
fn bench_throughput_reports_every_token() {
    pagoda_models::resolve_model_path(None)
        .expect("default model missing: run scripts/fetch-model");
    let json = std::env::temp_dir().join(format!("pagoda-bench-{}.json", std::process::id()));
    // 5 prompts with at most 2 running: admission, finishing and refilling all happen.
    let out = Command::new(env!("CARGO_BIN_EXE_pagoda"))
        .args([
            "bench",
            "throughput",
            "--device",
            "cpu",
            "--num-prompts",
            "5",
        ])
        .args([
            "--input-len",
            "12",
            "--output-len",
            "6",
            "--max-num-seqs",
            "2",
            "--json",
        ])
        .arg(&json)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run pagoda bench throughput");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Throughput:"), "{stdout}");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    std::fs::remove_file(&json).ok();
    assert_eq!(report["num_prompts"], 5);
    assert_eq!(report["num_output_tokens"], 5 * 6);
    assert_eq!(report["num_prompt_tokens"], 5 * 12);
    assert_eq!(report["device"], "cpu");
    let elapsed = report["elapsed_s"].as_f64().unwrap();
    let output_tps = report["output_tok_per_s"].as_f64().unwrap();
    assert!(elapsed > 0.0 && (output_tps * elapsed - 30.0).abs() < 1e-6);
    let total_tps = report["total_tok_per_s"].as_f64().unwrap();
    assert!((total_tps * elapsed - 90.0).abs() < 1e-6);
    // At most 2 of 5 at a time, 6 tokens each: at least 3 waves of 6 steps.
    assert!(report["num_steps"].as_u64().unwrap() >= 18);
}
