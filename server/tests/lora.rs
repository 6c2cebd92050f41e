//! LoRA adapters through the real server and the default model: the demo adapter's behaviour in
//! mixed batches (base requests unchanged), the vLLM-style admin endpoints with their errors,
//! and hot swapping under load with no failures beyond the documented 404s and no leaks.
mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use candle_core::{Device, Tensor};
use common::{chat_body, Server, MODEL};
use serde_json::{json, Value};

const SIGNATURE: &str = "-- answered by Pagoda";
const ADMIN: &str = "admin-secret";

fn demo_adapter() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/demo-lora/signature")
}

/// A random rank-8 q/v adapter shaped for the default model (SmolLM2-135M), in PEFT format.
fn random_adapter(dir: &Path, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = json!({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
        "target_modules": ["q_proj", "v_proj"], "bias": "none"});
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
    // Uniform in ±0.07 (std 0.04) from a xorshift stream.
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut random = |shape: (usize, usize)| {
        let v: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.14
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    let mut tensors = std::collections::HashMap::new();
    for l in 0..30 {
        for (m, out) in [("q_proj", 576), ("v_proj", 192)] {
            let p = format!("base_model.model.model.layers.{l}.self_attn.{m}");
            let a = random((8, 576));
            let b = random((out, 8));
            tensors.insert(format!("{p}.lora_A.weight"), a);
            tensors.insert(format!("{p}.lora_B.weight"), b);
        }
    }
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors")).unwrap();
}

async fn admin(s: &Server, path: &str, body: &Value, token: Option<&str>) -> (u16, String) {
    let mut r = s.client.post(s.url(path)).json(body);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let r = r.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn with_model(mut body: Value, model: &str) -> Value {
    body["model"] = model.into();
    body
}

fn text(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

const PROMPTS: [&str; 4] = [
    "What is the capital of Italy?",
    "Name a fruit that is yellow.",
    "How many legs does a spider have?",
    "What do bees make?",
];

async fn start(lora_dir: &Path, extra: &[&str]) -> Server {
    let lora = format!("signature={}", demo_adapter().display());
    let dir = lora_dir.to_str().unwrap();
    let mut args = vec!["--lora", &lora, "--lora-dir", dir, "--admin-token", ADMIN];
    args.extend_from_slice(extra);
    Server::start(&args).await
}

#[tokio::test]
async fn demo_adapter_in_mixed_batches_and_admin_endpoints() {
    let tmp = std::env::temp_dir().join(format!("pagoda-lora-e2e-{}", std::process::id()));
    let lora_dir = tmp.join("loras");
    random_adapter(&lora_dir.join("hot"), 1);
    // An adapter for another base model (the tiny fixture): wrong shapes.
    let tiny =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-llama-lora/qv-r4");
    std::fs::create_dir_all(lora_dir.join("tiny")).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(tiny.join(f), lora_dir.join("tiny").join(f)).unwrap();
    }
    std::fs::create_dir_all(tmp.join("outside")).unwrap();
    let s = start(&lora_dir, &[]).await;

    let (status, models) = s
        .client
        .get(s.url("/v1/models"))
        .send()
        .await
        .map(|r| (r.status().as_u16(), r))
        .unwrap();
    assert_eq!(status, 200);
    let models: Value = models.json().await.unwrap();
    let sig = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "signature")
        .expect("the adapter is listed");
    assert_eq!(sig["parent"], MODEL);

    // Base answers, one at a time.
    let mut base = Vec::new();
    for p in PROMPTS {
        let (st, v) = s.chat(chat_body(p, 64)).await;
        assert_eq!(st, 200, "{v}");
        base.push(text(&v));
    }
    // The same prompts for the base model and the adapter, all in flight together.
    let calls = PROMPTS
        .iter()
        .flat_map(|p| [MODEL, "signature"].map(|m| s.chat(with_model(chat_body(p, 64), m))));
    let results = futures::future::join_all(calls).await;
    let mut signed = 0;
    for (i, (st, v)) in results.into_iter().enumerate() {
        assert_eq!(st, 200, "{v}");
        let t = text(&v);
        if i % 2 == 0 {
            assert_eq!(t, base[i / 2], "a base request in a mixed batch changed");
            assert!(!t.contains(SIGNATURE));
        } else {
            assert_eq!(v["model"], "signature");
            signed += usize::from(t.trim_end().ends_with(SIGNATURE));
        }
    }
    assert!(
        signed >= 3,
        "the adapter signs its answers: {signed} of 4 did"
    );

    // Unknown model: a 404, never the base model.
    let (st, v) = s
        .chat(with_model(chat_body("Hi", 4), "no-such-adapter"))
        .await;
    assert_eq!(st, 404);
    assert_eq!(v["error"]["code"], "model_not_found");

    // Admin endpoints.
    let load = "/v1/load_lora_adapter";
    let unload = "/v1/unload_lora_adapter";
    let body = |name: &str, path: &str| json!({"lora_name": name, "lora_path": path});
    assert_eq!(admin(&s, load, &body("hot", "hot"), None).await.0, 401);
    assert_eq!(
        admin(&s, load, &body("hot", "hot"), Some("wrong")).await.0,
        401
    );
    let outside = tmp.join("outside");
    let bad: Vec<(Value, &str)> = vec![
        (body("x", "../outside"), ".."),
        (
            body("x", outside.to_str().unwrap()),
            "leaves the allowed directory",
        ),
        (body("x", "missing"), "does not exist"),
        (body("x", "tiny"), "do not fit"),
        (body(MODEL, "hot"), "base model"),
        (body("bad name", "hot"), "must be 1 to 128"),
        (json!({"lora_name": "x"}), "lora_path"),
        (json!([1, 2]), "invalid request"),
    ];
    for (b, needle) in bad {
        let (st, t) = admin(&s, load, &b, Some(ADMIN)).await;
        assert_eq!(st, 400, "{b}: {t}");
        let v: Value = serde_json::from_str(&t).unwrap();
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{b}: {msg}");
    }
    let (st, t) = admin(&s, load, &body("hot", "hot"), Some(ADMIN)).await;
    assert_eq!(st, 200, "{t}");
    let (st, v) = s.chat(with_model(chat_body("Hi", 8), "hot")).await;
    assert_eq!(st, 200, "{v}");
    let (st, t) = admin(&s, unload, &json!({"lora_name": "hot"}), Some(ADMIN)).await;
    assert_eq!(st, 200, "{t}");
    let (st, _) = s.chat(with_model(chat_body("Hi", 8), "hot")).await;
    assert_eq!(st, 404);
    let (st, _) = admin(&s, unload, &json!({"lora_name": "hot"}), Some(ADMIN)).await;
    assert_eq!(st, 404);

    s.assert_idle().await;
    assert_eq!(s.metric("pagoda_lora_adapters").await, 1.0);
    assert_eq!(s.metric("pagoda_lora_generations_live").await, 1.0);
    assert_eq!(s.health().await, 200);
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[tokio::test]
async fn hot_swap_under_load() {
    let tmp = std::env::temp_dir().join(format!("pagoda-lora-swap-{}", std::process::id()));
    let lora_dir = tmp.join("loras");
    for (i, name) in ["v1", "v2", "other"].iter().enumerate() {
        random_adapter(&lora_dir.join(name), 10 + i as u64);
    }
    // Two device slots for three adapters: requests wait for a slot rather than fail.
    let s = start(&lora_dir, &["--max-loras", "2"]).await;
    let load = |name: &'static str, path: &'static str| {
        let s = &s;
        async move {
            let body = json!({"lora_name": name, "lora_path": path});
            let (st, t) = admin(s, "/v1/load_lora_adapter", &body, Some(ADMIN)).await;
            assert_eq!(st, 200, "{t}");
        }
    };
    load("other", "other").await;
    load("hot", "v1").await;

    // The swapper replaces and unloads `hot` until every client has made its requests and at
    // least `MIN_ROUNDS` swaps happened; clients keep going until both hold, so the two overlap
    // however fast or slow the machine is.
    const MIN_ROUNDS: usize = 4;
    const REQUESTS_PER_CLIENT: usize = 6;
    let rounds = AtomicUsize::new(0);
    let clients_done = AtomicUsize::new(0);
    let swapper = async {
        let mut round = 0;
        while round < MIN_ROUNDS || clients_done.load(Relaxed) < 4 {
            load("hot", if round % 2 == 0 { "v2" } else { "v1" }).await;
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            if round % 3 == 2 {
                let body = json!({"lora_name": "hot"});
                let (st, t) = admin(&s, "/v1/unload_lora_adapter", &body, Some(ADMIN)).await;
                assert_eq!(st, 200, "{t}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            round += 1;
            rounds.store(round, Relaxed);
        }
    };
    let client = |worker: usize| {
        let (s, rounds, clients_done) = (&s, &rounds, &clients_done);
        async move {
            let models = [MODEL, "hot", "signature", "other"];
            let (mut ok, mut not_found) = (0, 0);
            let mut i = worker;
            while ok + not_found < REQUESTS_PER_CLIENT || rounds.load(Relaxed) < MIN_ROUNDS {
                let model = models[i % models.len()];
                i += 1;
                let (st, v) = s
                    .chat(with_model(chat_body(PROMPTS[i % 4], 8), model))
                    .await;
                match st {
                    200 => ok += 1,
                    404 if model == "hot" => {
                        assert_eq!(v["error"]["code"], "model_not_found");
                        not_found += 1;
                    }
                    _ => panic!("{model}: {st} {v}"),
                }
            }
            clients_done.fetch_add(1, Relaxed);
            (ok, not_found)
        }
    };
    let (_, counts) = tokio::join!(swapper, futures::future::join_all((0..4).map(client)));
    let ok: usize = counts.iter().map(|c| c.0).sum();
    assert!(
        ok >= 4 * REQUESTS_PER_CLIENT / 2,
        "most requests succeed ({ok})"
    );

    s.assert_idle().await;
    // Registered: signature, other and hot (loaded again after the last unload); every replaced
    // or unloaded generation is gone once its requests finished.
    let registered = s.metric("pagoda_lora_adapters").await;
    assert_eq!(s.metric("pagoda_lora_generations_live").await, registered);
    assert!(s.metric("pagoda_lora_slot_loads_total").await >= 3.0);
    assert_eq!(s.health().await, 200);
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[tokio::test]
async fn without_lora_the_admin_endpoints_say_so() {
    let s = Server::start(&[]).await;
    let load = json!({"lora_name": "x", "lora_path": "x"});
    let (st, t) = admin(&s, "/v1/load_lora_adapter", &load, None).await;
    assert_eq!(st, 400, "{t}");
    assert!(t.contains("LoRA is off"), "{t}");
    let (st, t) = admin(
        &s,
        "/v1/unload_lora_adapter",
        &json!({"lora_name": "x"}),
        None,
    )
    .await;
    assert_eq!(st, 400, "{t}");
    // Bodies that are not what the endpoints take.
    for body in [
        json!("x"),
        json!({"lora_name": 5, "lora_path": "x"}),
        json!({}),
    ] {
        let (st, t) = admin(&s, "/v1/load_lora_adapter", &body, None).await;
        assert_eq!(st, 400, "{body}: {t}");
    }
    let (st, v) = s.chat(with_model(chat_body("Hi", 4), "x")).await;
    assert_eq!(st, 404, "{v}");
    let models: Value = s
        .client
        .get(s.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"].as_array().unwrap().len(), 1);
    assert_eq!(s.health().await, 200);
}
