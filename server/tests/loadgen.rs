//! The load generator (`benches`) against a real server: its counts agree with the server's
//! usage fields and metrics, at fixed concurrency and with Poisson arrivals.
mod common;

use common::{Server, MODEL};
use pagoda_benches::lengths::{self, RequestShape};
use pagoda_benches::loadgen::{run, Arrival, LoadConfig, ServerInfo};

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
        arrival: Arrival::Concurrency(3),
        shapes: lengths::synthetic(&[4, 12], 6),
        first_request: 0,
    };
    let report = run(&cfg).await.unwrap();
    assert_eq!(report.errors, 0, "{:?}", report.error_samples);
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

    // Poisson arrivals with a cap and per-request lengths from a profile.
    let shapes = vec![
        RequestShape {
            prompt_len: 5,
            output_len: 3,
        },
        RequestShape {
            prompt_len: 9,
            output_len: 7,
        },
    ];
    let generated_before = s.metric("pagoda_generation_tokens_total").await;
    let poisson = run(&LoadConfig {
        num_requests: 6,
        arrival: Arrival::Poisson {
            rate: 50.0,
            max_concurrency: Some(2),
            seed: 1,
        },
        shapes,
        first_request: 100,
        ..cfg.clone()
    })
    .await
    .unwrap();
    assert_eq!(poisson.errors, 0, "{:?}", poisson.error_samples);
    assert_eq!(poisson.completion_tokens, 3 * (3 + 7));
    assert_eq!(
        (poisson.request_rate, poisson.concurrency),
        (Some(50.0), Some(2))
    );
    s.assert_idle().await;
    let generated = s.metric("pagoda_generation_tokens_total").await - generated_before;
    assert_eq!(generated as usize, poisson.completion_tokens);

    let info = ServerInfo::probe(&s.base, None, Some("pagoda".into())).await;
    assert_eq!(info.models, vec![MODEL.to_string()]);

    // A wrong model name is an error per request, not a crash of the generator.
    let bad = run(&LoadConfig {
        model: "nope".into(),
        num_requests: 2,
        ..cfg
    })
    .await
    .unwrap();
    assert_eq!(bad.errors, 2);
    assert!(
        bad.error_samples[0].starts_with("HTTP 404"),
        "{:?}",
        bad.error_samples
    );
}
