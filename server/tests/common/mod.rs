//! A real `pagoda serve` process on a free port with the real default model.
#![allow(dead_code)]
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const MODEL: &str = "SmolLM2-135M-Instruct";

pub struct Server {
    child: Child,
    pub base: String,
    pub client: reqwest::Client,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Server {
    pub async fn start(extra: &[&str]) -> Server {
        // Fails loudly when scripts/fetch-model didn't run.
        pagoda_models::resolve_model_path(None)
            .expect("default model missing: run scripts/fetch-model");
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_pagoda"))
            .args(["serve", "--port", &port.to_string()])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start pagoda");
        let server = Server {
            child,
            base: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(r) = server.client.get(server.url("/health")).send().await {
                if r.status() == 200 {
                    return server;
                }
            }
            assert!(Instant::now() < deadline, "server did not become healthy");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `GET /health`'s status code.
    pub async fn health(&self) -> u16 {
        self.client
            .get(self.url("/health"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}")),
        )
    }

    pub async fn chat(&self, body: Value) -> (u16, Value) {
        self.post("/v1/chat/completions", &body).await
    }

    /// A metric's value from /metrics.
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self
            .client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix(' '))
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or_else(|| panic!("metric {name} missing"))
    }

    /// Waits until no request is running or waiting and every KV block is free.
    pub async fn assert_idle(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let running = self.metric("pagoda_requests_running").await;
            let waiting = self.metric("pagoda_requests_waiting").await;
            let used = self.metric("pagoda_kv_blocks_used").await;
            if running == 0.0 && waiting == 0.0 && used == 0.0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not idle: running {running}, waiting {waiting}, blocks used {used}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Reads an SSE response to the end; returns the JSON of each `data:` event and whether
    /// `[DONE]` came last.
    pub async fn sse(&self, path: &str, body: &Value) -> (Vec<Value>, bool) {
        let r = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        let text = r.text().await.unwrap();
        let mut events = Vec::new();
        let mut done = false;
        for line in text.lines() {
            if let Some(data) = line.strip_prefix("data: ") {
                assert!(!done, "data after [DONE]");
                if data == "[DONE]" {
                    done = true;
                } else {
                    events.push(serde_json::from_str(data).unwrap());
                }
            }
        }
        (events, done)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A greedy chat request body.
pub fn chat_body(content: &str, max_tokens: u32) -> Value {
    serde_json::json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}
