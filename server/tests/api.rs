//! The OpenAI-compatible API against a real server with the real default model.
mod common;

use common::{chat_body, Server, MODEL};
use serde_json::{json, Value};

fn text_of(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn chat_completions_models_and_usage() {
    let s = Server::start(&["--dequantize"]).await;

    let r = s.client.get(s.url("/v1/models")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let models: Value = r.json().await.unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], MODEL);

    // Non-streamed chat: a real answer with usage that matches the tokens.
    let (status, v) = s
        .chat(chat_body("What is the capital of France?", 32))
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["model"], MODEL);
    assert!(text_of(&v).contains("Paris"), "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let usage = &v["usage"];
    assert_eq!(
        usage["total_tokens"],
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
    // The completion's token count equals re-tokenizing its text plus the end-of-turn token.
    let model = pagoda_models::load(
        &pagoda_models::resolve_model_path(None).unwrap(),
        &Default::default(),
    )
    .unwrap();
    let ids = model.tokenizer.encode(&text_of(&v), false).unwrap();
    assert_eq!(
        usage["completion_tokens"].as_u64().unwrap() as usize,
        ids.len() + 1
    );
    // Prompt tokens equal the chat-templated prompt's tokens.
    let prompt = model
        .tokenizer
        .apply_chat_template(
            &[pagoda_models::chat_template::ChatMessage {
                role: "user".into(),
                content: "What is the capital of France?".into(),
            }],
            true,
        )
        .unwrap();
    assert_eq!(
        usage["prompt_tokens"].as_u64().unwrap() as usize,
        model.tokenizer.encode(&prompt, false).unwrap().len()
    );

    // Streamed: role first, the same text, usage at the end, [DONE].
    let mut body = chat_body("What is the capital of France?", 32);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let (events, done) = s.sse("/v1/chat/completions", &body).await;
    assert!(done);
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, text_of(&v));
    let last = events.last().unwrap();
    assert_eq!(last["choices"].as_array().unwrap().len(), 0);
    assert_eq!(last["usage"], v["usage"]);
    let finish: Vec<_> = events
        .iter()
        .filter_map(|e| e["choices"][0]["finish_reason"].as_str())
        .collect();
    assert_eq!(finish, vec!["stop"]);

    // n = 2 with sampling: two choices, usage counts both.
    let mut body = chat_body("Tell me a story.", 8);
    body["n"] = json!(2);
    body["temperature"] = json!(1.0);
    body["seed"] = json!(1);
    let (status, v) = s.chat(body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    assert_eq!(v["choices"][1]["index"], 1);
    assert_eq!(v["usage"]["completion_tokens"], 16);

    // Logprobs: one entry per token, top alternatives sorted, the chosen one is the best (greedy).
    let mut body = chat_body("Hi", 4);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(3);
    let (status, v) = s.chat(body).await;
    assert_eq!(status, 200, "{v}");
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        content.len() as u64,
        v["usage"]["completion_tokens"].as_u64().unwrap()
    );
    for t in content {
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        assert!(t["logprob"].as_f64().unwrap() <= 0.0);
        assert_eq!(t["token"], top[0]["token"]);
        assert!(top[0]["logprob"].as_f64() >= top[1]["logprob"].as_f64());
    }
    s.assert_idle().await;
}

#[tokio::test]
async fn stop_strings_and_completions() {
    let s = Server::start(&["--dequantize"]).await;
    let (_, full) = s
        .chat(chat_body("What is the capital of France?", 32))
        .await;
    let full = text_of(&full);
    let at = full.find("Paris").unwrap();
    // "aris" begins inside a token: held back across the boundary, cut exactly.
    let mut body = chat_body("What is the capital of France?", 32);
    body["stop"] = json!(["aris", "never-appears"]);
    let (_, v) = s.chat(body.clone()).await;
    assert_eq!(text_of(&v), &full[..at + 1]);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    body["stream"] = json!(true);
    let (events, done) = s.sse("/v1/chat/completions", &body).await;
    assert!(done);
    let streamed: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, &full[..at + 1]);

    // Completions: text prompt, echo, token-id prompt, list of prompts, streaming.
    let (status, v) = s
        .post("/v1/completions", &json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 5, "temperature": 0, "echo": true}))
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert!(text.starts_with("The capital of France is"), "{text}");
    assert!(text.contains("Paris"), "{text}");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    let (status, v) = s.post("/v1/completions", &json!({"model": MODEL, "prompt": [[504, 3575, 282, 4649, 314]], "max_tokens": 3, "temperature": 0})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["prompt_tokens"], 5);
    let (status, v) = s
        .post("/v1/completions", &json!({"model": MODEL, "prompt": ["One", "Two"], "max_tokens": 2, "n": 2, "logprobs": 2}))
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"].as_array().unwrap().len(), 4);
    assert_eq!(
        v["choices"][0]["logprobs"]["tokens"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let (events, done) = s
        .sse("/v1/completions", &json!({"model": MODEL, "prompt": "Hello", "max_tokens": 4, "stream": true, "stream_options": {"include_usage": true}}))
        .await;
    assert!(done);
    assert_eq!(events.last().unwrap()["usage"]["completion_tokens"], 4);
    s.assert_idle().await;
}

#[tokio::test]
async fn api_key_is_required_when_set() {
    let s = Server::start(&["--api-key", "sekrit"]).await;
    let r = s
        .client
        .post(s.url("/v1/chat/completions"))
        .json(&chat_body("Hi", 2))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "authentication_error");
    let r = s
        .client
        .post(s.url("/v1/chat/completions"))
        .bearer_auth("wrong")
        .json(&chat_body("Hi", 2))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = s
        .client
        .post(s.url("/v1/chat/completions"))
        .bearer_auth("sekrit")
        .json(&chat_body("Hi", 2))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Health and metrics stay open for probes.
    assert_eq!(s.health().await, 200);
}
