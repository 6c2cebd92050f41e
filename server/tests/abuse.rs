//! Bad input, disconnects and overload against a real server: every failure is a 4xx in
//! OpenAI's error shape, nothing crashes or hangs, and nothing leaks.
mod common;

use std::time::Duration;

use common::{chat_body, Server, MODEL};
use serde_json::{json, Value};

const CHAT: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";

enum Body {
    Json(Value),
    Raw(Vec<u8>, &'static str),
}

fn chat_with(field: &str, value: Value) -> Body {
    let mut b = chat_body("Hi", 4);
    b[field] = value;
    Body::Json(b)
}

fn completion_with(field: &str, value: Value) -> Body {
    let mut b = json!({"model": MODEL, "prompt": "Hi", "max_tokens": 4});
    b[field] = value;
    Body::Json(b)
}

fn nested(depth: usize) -> Vec<u8> {
    let mut s = String::from("{\"model\":\"x\",\"messages\":");
    s.push_str(&"[".repeat(depth));
    s.push_str(&"]".repeat(depth));
    s.push('}');
    s.into_bytes()
}

fn cases() -> Vec<(&'static str, &'static str, Body, u16)> {
    let long_prompt = "word ".repeat(9000);
    vec![
        (
            "malformed json",
            CHAT,
            Body::Raw(b"{\"model\": ".to_vec(), "application/json"),
            400,
        ),
        (
            "empty body",
            CHAT,
            Body::Raw(Vec::new(), "application/json"),
            400,
        ),
        (
            "json array body",
            CHAT,
            Body::Raw(b"[1,2]".to_vec(), "application/json"),
            400,
        ),
        (
            "invalid utf-8",
            CHAT,
            Body::Raw(b"{\"model\":\"\xff\xfe\"}".to_vec(), "application/json"),
            400,
        ),
        (
            "deeply nested",
            CHAT,
            Body::Raw(nested(5000), "application/json"),
            400,
        ),
        (
            "10 MB body",
            CHAT,
            Body::Raw(vec![b' '; 10 << 20], "application/json"),
            413,
        ),
        (
            "wrong content type",
            CHAT,
            Body::Raw(
                serde_json::to_vec(&chat_body("Hi", 4)).unwrap(),
                "text/plain",
            ),
            415,
        ),
        (
            "form content type",
            CHAT,
            Body::Raw(b"model=x".to_vec(), "application/x-www-form-urlencoded"),
            415,
        ),
        (
            "missing model",
            CHAT,
            Body::Json(json!({"messages": [{"role": "user", "content": "Hi"}]})),
            400,
        ),
        (
            "missing messages",
            CHAT,
            Body::Json(json!({"model": MODEL})),
            400,
        ),
        (
            "unknown model",
            CHAT,
            chat_with("model", json!("gpt-4")),
            404,
        ),
        (
            "model not a string",
            CHAT,
            chat_with("model", json!(42)),
            400,
        ),
        (
            "empty messages",
            CHAT,
            chat_with("messages", json!([])),
            400,
        ),
        (
            "messages not a list",
            CHAT,
            chat_with("messages", json!("hi")),
            400,
        ),
        (
            "bad role",
            CHAT,
            chat_with("messages", json!([{"role": "wizard", "content": "Hi"}])),
            400,
        ),
        (
            "content wrong type",
            CHAT,
            chat_with("messages", json!([{"role": "user", "content": 5}])),
            400,
        ),
        (
            "image part",
            CHAT,
            chat_with(
                "messages",
                json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]),
            ),
            400,
        ),
        (
            "unknown part type",
            CHAT,
            chat_with(
                "messages",
                json!([{"role": "user", "content": [{"type": "audio"}]}]),
            ),
            400,
        ),
        (
            "text part without text",
            CHAT,
            chat_with(
                "messages",
                json!([{"role": "user", "content": [{"type": "text"}]}]),
            ),
            400,
        ),
        (
            "temperature string",
            CHAT,
            chat_with("temperature", json!("hot")),
            400,
        ),
        (
            "temperature negative",
            CHAT,
            chat_with("temperature", json!(-1)),
            400,
        ),
        (
            "temperature huge",
            CHAT,
            chat_with("temperature", json!(1e9)),
            400,
        ),
        ("top_p zero", CHAT, chat_with("top_p", json!(0)), 400),
        ("top_p above one", CHAT, chat_with("top_p", json!(1.5)), 400),
        ("top_k negative", CHAT, chat_with("top_k", json!(-5)), 400),
        (
            "top_k beyond vocab",
            CHAT,
            chat_with("top_k", json!(10_000_000)),
            400,
        ),
        ("min_p above one", CHAT, chat_with("min_p", json!(2)), 400),
        (
            "presence_penalty out of range",
            CHAT,
            chat_with("presence_penalty", json!(3)),
            400,
        ),
        (
            "frequency_penalty out of range",
            CHAT,
            chat_with("frequency_penalty", json!(-3)),
            400,
        ),
        (
            "repetition_penalty zero",
            CHAT,
            chat_with("repetition_penalty", json!(0)),
            400,
        ),
        (
            "max_tokens zero",
            CHAT,
            chat_with("max_tokens", json!(0)),
            400,
        ),
        (
            "max_tokens negative",
            CHAT,
            chat_with("max_tokens", json!(-1)),
            400,
        ),
        (
            "max_tokens beyond context",
            CHAT,
            chat_with("max_tokens", json!(100_000)),
            400,
        ),
        (
            "max_completion_tokens zero",
            CHAT,
            chat_with("max_completion_tokens", json!(0)),
            400,
        ),
        ("n zero", CHAT, chat_with("n", json!(0)), 400),
        ("huge n", CHAT, chat_with("n", json!(1_000_000)), 400),
        (
            "logit_bias bad key",
            CHAT,
            chat_with("logit_bias", json!({"abc": 1})),
            400,
        ),
        (
            "logit_bias token out of vocab",
            CHAT,
            chat_with("logit_bias", json!({"99999999": 1})),
            400,
        ),
        (
            "logit_bias value out of range",
            CHAT,
            chat_with("logit_bias", json!({"5": 1000})),
            400,
        ),
        (
            "top_logprobs too many",
            CHAT,
            Body::Json(
                json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "logprobs": true, "top_logprobs": 50}),
            ),
            400,
        ),
        (
            "top_logprobs without logprobs",
            CHAT,
            chat_with("top_logprobs", json!(2)),
            400,
        ),
        (
            "stop empty string",
            CHAT,
            chat_with("stop", json!([""])),
            400,
        ),
        (
            "stop too many",
            CHAT,
            chat_with("stop", json!(vec!["x"; 100])),
            400,
        ),
        ("stop wrong type", CHAT, chat_with("stop", json!(7)), 400),
        (
            "stream not bool",
            CHAT,
            chat_with("stream", json!("yes")),
            400,
        ),
        (
            "stream_options without stream",
            CHAT,
            chat_with("stream_options", json!({"include_usage": true})),
            400,
        ),
        (
            "min_tokens above max_tokens",
            CHAT,
            chat_with("min_tokens", json!(10)),
            400,
        ),
        (
            "seed not a number",
            CHAT,
            chat_with("seed", json!("abc")),
            400,
        ),
        (
            "prompt too long",
            CHAT,
            chat_with(
                "messages",
                json!([{"role": "user", "content": long_prompt}]),
            ),
            400,
        ),
        (
            "completion prompt missing",
            COMPLETIONS,
            Body::Json(json!({"model": MODEL})),
            400,
        ),
        (
            "completion prompt number",
            COMPLETIONS,
            completion_with("prompt", json!(5)),
            400,
        ),
        (
            "completion prompt empty list",
            COMPLETIONS,
            completion_with("prompt", json!([])),
            400,
        ),
        (
            "completion prompt mixed list",
            COMPLETIONS,
            completion_with("prompt", json!(["a", 1])),
            400,
        ),
        (
            "completion token out of vocab",
            COMPLETIONS,
            completion_with("prompt", json!([1, 2, 99999999])),
            400,
        ),
        (
            "completion negative token",
            COMPLETIONS,
            completion_with("prompt", json!([1, -2])),
            400,
        ),
        (
            "completion empty string",
            COMPLETIONS,
            completion_with("prompt", json!("")),
            400,
        ),
        (
            "completion suffix",
            COMPLETIONS,
            completion_with("suffix", json!("end")),
            400,
        ),
        (
            "completion logprobs too many",
            COMPLETIONS,
            completion_with("logprobs", json!(99)),
            400,
        ),
        (
            "completion unknown model",
            COMPLETIONS,
            completion_with("model", json!("nope")),
            404,
        ),
        (
            "completion echo with stream",
            COMPLETIONS,
            Body::Json(json!({"model": MODEL, "prompt": "Hi", "echo": true, "stream": true})),
            400,
        ),
        ("unknown path", "/v1/nothing", Body::Json(json!({})), 404),
    ]
}

#[tokio::test]
async fn every_bad_request_gets_its_4xx_in_openai_shape() {
    let s = Server::start(&[]).await;
    let cases = cases();
    assert!(cases.len() >= 40);
    for (name, path, body, want) in cases {
        // A fresh connection per case: the server may close one after refusing a huge body.
        let req = reqwest::Client::new().post(s.url(path));
        let req = match body {
            Body::Json(v) => req.json(&v),
            Body::Raw(bytes, ct) => req.header("content-type", ct).body(bytes),
        };
        let r = req.send().await.unwrap_or_else(|e| panic!("{name}: {e}"));
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        assert_eq!(status, want, "{name}: got {status}: {text}");
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{name}: body is not JSON: {text}"));
        let err = &v["error"];
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{name}: no message: {v}"
        );
        assert!(err["type"].is_string(), "{name}: no type: {v}");
        assert!(
            err.get("param").is_some() && err.get("code").is_some(),
            "{name}: missing param/code: {v}"
        );
    }
    // Wrong method on a real route.
    let r = s.client.get(s.url(CHAT)).send().await.unwrap();
    assert_eq!(r.status(), 405);
    // The context-length error names both numbers.
    let mut b = chat_body("Hi", 100_000);
    b["max_tokens"] = json!(100_000);
    let (_, v) = s.chat(b).await;
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("8192") && msg.contains("100000"), "{msg}");
    // Still healthy, still answering, nothing held.
    assert_eq!(s.health().await, 200);
    let (status, _) = s.chat(chat_body("Hi", 2)).await;
    assert_eq!(status, 200);
    s.assert_idle().await;
    assert!(
        s.metric("pagoda_request_errors_total{kind=\"invalid_request\"}")
            .await
            >= 30.0
    );
}

#[tokio::test]
async fn dropped_streams_free_their_blocks() {
    let s = Server::start(&[]).await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let client = s.client.clone();
        let url = s.url(CHAT);
        tasks.push(tokio::spawn(async move {
            let mut body = chat_body(&format!("Count from {i} to one thousand."), 500);
            body["stream"] = json!(true);
            body["ignore_eos"] = json!(true);
            let mut r = client.post(url).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 200);
            // Read a couple of chunks, then hang up.
            let _ = r.chunk().await.unwrap();
            let _ = r.chunk().await.unwrap();
            drop(r);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    s.assert_idle().await;
    assert_eq!(s.metric("pagoda_kv_blocks_used").await, 0.0);
}

#[tokio::test]
async fn overload_gets_429_and_admitted_requests_complete() {
    let s = Server::start(&["--max-num-seqs", "2", "--max-waiting", "4"]).await;
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let client = s.client.clone();
        let url = s.url(CHAT);
        tasks.push(tokio::spawn(async move {
            let r = client
                .post(url)
                .json(&chat_body("What is the capital of France?", 24))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let retry = r.headers().get("retry-after").is_some();
            let v: Value = r.json().await.unwrap();
            (status, retry, v)
        }));
    }
    let (mut ok, mut busy) = (0, 0);
    for t in tasks {
        let (status, retry, v) = t.await.unwrap();
        match status {
            200 => {
                ok += 1;
                assert!(!v["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap()
                    .is_empty());
                assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0);
            }
            429 => {
                busy += 1;
                assert!(retry, "429 needs Retry-After");
                assert_eq!(v["error"]["type"], "rate_limit_error");
            }
            other => panic!("unexpected status {other}: {v}"),
        }
    }
    assert!(
        busy > 0,
        "a burst of 32 over 6 slots must be refused in part"
    );
    assert!(ok >= 6, "at least the admitted ones complete ({ok})");
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.assert_idle().await;
}
