//! The load generator (`benches`) against a real server: its counts agree with the server's
//! usage fields and metrics.
mod common;

use common::{Server, MODEL};
use pagoda_benches::loadgen::{run, LoadConfig};

#[tokio::test]
async fn load_generator_counts_agree_with_the_server() {
    let s = Server::start(&[]).await;
    let generated_before = s.metric("pagoda_generation_tokens_total").await;
    let prompt_before = s.metric("pagoda_prompt_tokens_total").await;
    let cfg = LoadConfig {
        url: s.base.clone(),
        model: MODEL.into(),
        api_key: None,
        num_requests: 7,
        concurrency: 3,
        prompt_words: vec![4, 12],
        max_tokens: 6,
    };
    let report = run(&cfg).await.unwrap();
    assert_eq!(report.errors, 0);
    assert_eq!(
        report.completion_tokens,
        7 * 6,
        "ignore_eos: every request runs to max_tokens"
    );
    assert!(report.num_chunks > 0 && report.num_chunks <= report.completion_tokens);
    s.assert_idle().await;
    let generated = s.metric("pagoda_generation_tokens_total").await - generated_before;
    let prompt = s.metric("pagoda_prompt_tokens_total").await - prompt_before;
    assert_eq!(generated as usize, report.completion_tokens);
    assert_eq!(prompt as usize, report.prompt_tokens);
    assert!(report.ttft_ms.p50 > 0.0 && report.ttft_ms.p50 <= report.ttft_ms.p99);
    assert!(report.tpot_ms.p50 > 0.0 && report.output_tok_per_s > 0.0);
    // A wrong model name is an error per request, not a crash of the generator.
    let bad = run(&LoadConfig {
        model: "nope".into(),
        num_requests: 2,
        ..cfg
    })
    .await
    .unwrap();
    assert_eq!(bad.errors, 2);
}
