//! The real default model behind the real engine: answers, batch invariance, preemption,
//! chunked prefill, seeds, stop strings, aborts. Every test ends with the KV pool full again.
use pagoda_engine::{
    EngineConfig, EngineHandle, FinishReason, GenerateRequest, Prompt, SamplingParams,
    SchedulerConfig,
};
use pagoda_models::chat_template::ChatMessage;
use pagoda_models::LoadOptions;
use pagoda_tests::default_model;

fn start(config: EngineConfig, dequantize: bool) -> EngineHandle {
    let opts = LoadOptions {
        dequantize,
        ..LoadOptions::default()
    };
    let loaded = pagoda_models::load(&default_model(), &opts).unwrap();
    EngineHandle::start(loaded, config).unwrap()
}

fn chat(text: &str) -> Prompt {
    Prompt::Chat(vec![ChatMessage {
        role: "user".into(),
        content: text.into(),
    }])
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens,
        ..Default::default()
    }
}

async fn generate(
    engine: &EngineHandle,
    prompt: Prompt,
    params: SamplingParams,
) -> (String, Vec<u32>) {
    let out = run(engine, GenerateRequest::new(prompt, params)).await;
    (out.text, out.tokens.iter().map(|t| t.id).collect())
}

async fn run(engine: &EngineHandle, request: GenerateRequest) -> pagoda_engine::StreamOutput {
    engine
        .submit(request)
        .await
        .unwrap()
        .collect()
        .await
        .unwrap()
}

/// Every request is gone and every block is back in the pool.
async fn assert_idle(engine: &EngineHandle) {
    // Aborts travel through the command channel; give the engine thread a moment.
    for _ in 0..100 {
        let s = engine.stats().await.unwrap();
        if s.num_running == 0 && s.num_waiting == 0 && s.num_free_blocks == s.num_blocks {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("engine not idle: {:?}", engine.stats().await.unwrap());
}

const PROMPTS: [&str; 16] = [
    "What is the capital of France?",
    "Name three colors.",
    "Write a haiku about the sea.",
    "What is 2 + 2?",
    "Who wrote Hamlet?",
    "Give me a synonym for happy.",
    "What is the boiling point of water?",
    "Translate 'hello' to Spanish.",
    "What is a prime number?",
    "List two planets.",
    "Why is the sky blue?",
    "What do bees make?",
    "How many legs does a spider have?",
    "What is the opposite of cold?",
    "Tell me a fun fact about cats.",
    "What language is spoken in Brazil?",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_chat_knows_the_capital_of_france() {
    // The f32 (dequantized) path: on the Q4_1 path, whose activations are quantized to 8 bits,
    // the first answer token is a near-tie and the model wanders off; with f32 weights and
    // activations it answers directly.
    let engine = start(EngineConfig::default(), true);
    let (text, _) = generate(&engine, chat("What is the capital of France?"), greedy(32)).await;
    assert!(text.contains("Paris"), "answer: {text:?}");
    assert_idle(&engine).await;
    engine.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_of_sixteen_gives_exactly_the_tokens_of_each_alone() {
    let engine = start(EngineConfig::default(), false);
    let mut alone = Vec::new();
    for p in PROMPTS {
        alone.push(generate(&engine, chat(p), greedy(12)).await.1);
    }
    let streams = futures_join(PROMPTS.iter().map(|p| {
        let engine = engine.clone();
        async move { generate(&engine, chat(p), greedy(12)).await.1 }
    }))
    .await;
    for (i, (a, b)) in alone.iter().zip(&streams).enumerate() {
        assert_eq!(a, b, "prompt {i} ({:?}) differs when batched", PROMPTS[i]);
    }
    assert_idle(&engine).await;
    engine.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preemption_with_a_small_pool_gives_the_same_tokens() {
    let big = start(EngineConfig::default(), false);
    let prompts = &PROMPTS[..8];
    let expected = futures_join(prompts.iter().map(|p| {
        let big = big.clone();
        async move { generate(&big, chat(p), greedy(24)).await.1 }
    }))
    .await;
    assert_eq!(big.stats().await.unwrap().num_preemptions, 0);
    big.shutdown();

    // 16 blocks of 16 = 256 token slots for 8 requests of ~60 tokens each.
    let small = start(
        EngineConfig {
            num_blocks: Some(16),
            ..EngineConfig::default()
        },
        false,
    );
    let got = futures_join(prompts.iter().map(|p| {
        let small = small.clone();
        async move { generate(&small, chat(p), greedy(24)).await.1 }
    }))
    .await;
    assert!(
        small.stats().await.unwrap().num_preemptions > 0,
        "the small pool must force preemption"
    );
    assert_eq!(got, expected);
    assert_idle(&small).await;
    small.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_prefill_gives_the_same_tokens() {
    let long = "Summarize this: ".to_string()
        + &"The quick brown fox jumps over the lazy dog. ".repeat(12);
    let big = start(EngineConfig::default(), false);
    let expected = generate(&big, chat(&long), greedy(16)).await.1;
    big.shutdown();
    let scheduler = SchedulerConfig {
        max_num_batched_tokens: 24,
        max_num_seqs: 8,
    };
    let small = start(
        EngineConfig {
            scheduler,
            ..EngineConfig::default()
        },
        false,
    );
    // A short request decodes alongside the long prompt's chunks.
    let (got, other) = tokio::join!(
        generate(&small, chat(&long), greedy(16)),
        generate(&small, chat(PROMPTS[3]), greedy(16))
    );
    assert_eq!(got.1, expected);
    assert!(!other.1.is_empty());
    assert_idle(&small).await;
    small.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_sampling_is_reproducible_whatever_shares_the_batch() {
    let engine = start(EngineConfig::default(), false);
    let params = |seed| SamplingParams {
        temperature: 1.0,
        top_p: 0.95,
        seed: Some(seed),
        max_tokens: 16,
        ..Default::default()
    };
    let alone = generate(&engine, chat(PROMPTS[2]), params(7)).await.1;
    let mut jobs = vec![(PROMPTS[2], 7)];
    jobs.extend(PROMPTS[4..10].iter().map(|p| (*p, 99)));
    let batch = futures_join(jobs.into_iter().map(|(p, seed)| {
        let engine = engine.clone();
        async move { generate(&engine, chat(p), params(seed)).await.1 }
    }))
    .await;
    assert_eq!(batch[0], alone);
    let other_seed = generate(&engine, chat(PROMPTS[2]), params(8)).await.1;
    assert_ne!(
        other_seed, alone,
        "a different seed should give different tokens"
    );
    assert_idle(&engine).await;
    engine.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_cut_the_text_and_finish_with_stop() {
    let engine = start(EngineConfig::default(), true);
    let (full, _) = generate(&engine, chat("What is the capital of France?"), greedy(32)).await;
    let at = full.find("Paris").expect("answer mentions Paris");
    // "aris" most likely starts mid-token: the matcher holds text back across tokens.
    let request = GenerateRequest {
        stop: vec!["aris".into()],
        ..GenerateRequest::new(chat("What is the capital of France?"), greedy(32))
    };
    let out = run(&engine, request).await;
    assert_eq!(out.text, full[..at + 1]);
    assert_eq!(out.finish_reason, Some(FinishReason::Stop));
    assert_idle(&engine).await;
    engine.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_streams_mid_way_frees_everything() {
    let engine = start(EngineConfig::default(), false);
    for p in &PROMPTS[..6] {
        let mut stream = engine
            .submit(GenerateRequest::new(chat(p), greedy(200)))
            .await
            .unwrap();
        let first = stream.next().await.unwrap().unwrap();
        assert!(first.finish_reason.is_none());
        drop(stream);
    }
    // And some that never got a token.
    for p in &PROMPTS[6..10] {
        drop(
            engine
                .submit(GenerateRequest::new(chat(p), greedy(200)))
                .await
                .unwrap(),
        );
    }
    assert_idle(&engine).await;
    engine.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn length_and_eos_finish_reasons() {
    let engine = start(EngineConfig::default(), true);
    let out = run(&engine, GenerateRequest::new(chat(PROMPTS[0]), greedy(3))).await;
    assert_eq!(out.tokens.len(), 3);
    assert_eq!(out.finish_reason, Some(FinishReason::Length));
    let out = run(&engine, GenerateRequest::new(chat(PROMPTS[0]), greedy(64))).await;
    assert_eq!(out.finish_reason, Some(FinishReason::Stop));
    assert!(engine
        .tokenizer()
        .eos_token_ids
        .contains(&out.tokens.last().unwrap().id));
    assert!(!out.text.contains("<|im_end|>"));
    let params = SamplingParams {
        ignore_eos: true,
        ..greedy(40)
    };
    let out = engine
        .submit(GenerateRequest::new(chat(PROMPTS[0]), params))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(out.tokens.len(), 40, "ignore_eos runs to max_tokens");
    assert_idle(&engine).await;
    engine.shutdown();
}

/// Runs futures concurrently and returns their outputs in order.
async fn futures_join<F>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_greedy_fast_path_matches_the_full_sampler() {
    // Without logprobs the argmax is taken where the logits are; with them the full row goes
    // through the host sampler. Same tokens, also when both kinds share a batch.
    let engine = start(EngineConfig::default(), false);
    let with_logprobs = SamplingParams {
        logprobs: Some(1),
        ..greedy(16)
    };
    let jobs: Vec<_> = PROMPTS[..6]
        .iter()
        .enumerate()
        .map(|(i, p)| {
            (
                *p,
                if i % 2 == 0 {
                    greedy(16)
                } else {
                    with_logprobs.clone()
                },
            )
        })
        .collect();
    let mixed = futures_join(jobs.into_iter().map(|(p, params)| {
        let engine = engine.clone();
        async move { generate(&engine, chat(p), params).await.1 }
    }))
    .await;
    for (i, p) in PROMPTS[..6].iter().enumerate() {
        let other = if i % 2 == 0 {
            with_logprobs.clone()
        } else {
            greedy(16)
        };
        assert_eq!(
            generate(&engine, chat(p), other).await.1,
            mixed[i],
            "prompt {i}"
        );
    }
    assert_idle(&engine).await;
    engine.shutdown();
}

/// LoRA requests through preemption, chunked prefill and slot eviction (two adapter
/// generations and one device slot) give the tokens they give alone on a roomy engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_survive_preemption_chunking_and_slot_eviction() {
    let demo = pagoda_tests::fixture("demo-lora/signature");
    let lora = |max_loras| {
        Some(pagoda_adapters::AdapterLimits {
            max_loras,
            ..Default::default()
        })
    };
    let submit = |engine: &EngineHandle, i: usize| {
        let engine = engine.clone();
        async move {
            let adapter = [None, Some("sig"), Some("sig2")][i % 3].map(str::to_string);
            let request = GenerateRequest {
                adapter,
                ..GenerateRequest::new(chat(PROMPTS[i]), greedy(24))
            };
            let out = run(&engine, request).await;
            out.tokens.iter().map(|t| t.id).collect::<Vec<u32>>()
        }
    };
    let load = |engine: &EngineHandle| {
        let registry = engine.adapters().unwrap();
        registry.load("sig", &demo).unwrap();
        registry.load("sig2", &demo).unwrap();
    };

    let roomy = start(
        EngineConfig {
            lora: lora(4),
            ..EngineConfig::default()
        },
        false,
    );
    load(&roomy);
    let mut expected = Vec::new();
    for i in 0..8 {
        expected.push(submit(&roomy, i).await);
    }
    roomy.shutdown();

    let tight = start(
        EngineConfig {
            scheduler: SchedulerConfig {
                max_num_batched_tokens: 24,
                max_num_seqs: 8,
            },
            // 6 blocks of 16 tokens: one request (~75 tokens) fits, two running together don't.
            num_blocks: Some(6),
            lora: lora(1),
            ..EngineConfig::default()
        },
        false,
    );
    load(&tight);
    let got = futures_join((0..8).map(|i| submit(&tight, i))).await;
    let stats = tight.stats().await.unwrap();
    assert!(
        stats.num_preemptions > 0,
        "the small pool must force preemption"
    );
    // One slot, two adapters: the second waits for the first's requests, then replaces it.
    assert!(
        stats.num_lora_slot_loads >= 2,
        "one slot for two adapters must swap them ({} loads)",
        stats.num_lora_slot_loads
    );
    assert_eq!(got, expected);
    assert_idle(&tight).await;
    tight.shutdown();
}
