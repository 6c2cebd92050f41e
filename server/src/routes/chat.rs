//! `POST /v1/chat/completions`.
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use pagoda_engine::{Prompt, TokenInfo};
use pagoda_models::chat_template::ChatMessage;
use serde_json::json;

use crate::app::{parse_json, Ctx};
use crate::error::ApiError;
use crate::generation::{self, finish_reason};
use crate::openai::{
    ChatCompletionRequest, ChatLogprobs, ChatTokenLogprob, ContentPart, MessageContent, TopLogprob,
    Usage,
};

const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

fn messages(req: &mut ChatCompletionRequest) -> Result<Vec<ChatMessage>, ApiError> {
    if req.messages.is_empty() {
        return Err(ApiError::bad_request(
            Some("messages"),
            "`messages` must contain at least one message",
        ));
    }
    let mut out = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.drain(..).enumerate() {
        if !ROLES.contains(&m.role.as_str()) {
            return Err(ApiError::bad_request(
                Some("messages"),
                format!(
                    "messages[{i}].role must be one of {ROLES:?}, got {:?}",
                    m.role
                ),
            ));
        }
        let content = match m.content {
            None => String::new(),
            Some(MessageContent::Text(t)) => t,
            Some(MessageContent::Parts(parts)) => text_of(i, parts)?,
        };
        out.push(ChatMessage {
            role: m.role,
            content,
        });
    }
    Ok(out)
}

fn text_of(i: usize, parts: Vec<ContentPart>) -> Result<String, ApiError> {
    let mut text = String::new();
    for p in parts {
        match (p.kind.as_str(), p.text) {
            ("text", Some(t)) => text.push_str(&t),
            ("text", None) => {
                return Err(ApiError::bad_request(
                    Some("messages"),
                    format!("messages[{i}]: a text part needs `text`"),
                ))
            }
            ("image_url" | "input_image" | "image", _) => {
                return Err(ApiError::bad_request(
                    Some("messages"),
                    "images are not supported by this model",
                ))
            }
            (other, _) => {
                return Err(ApiError::bad_request(
                    Some("messages"),
                    format!("messages[{i}]: content part type {other:?} is not supported"),
                ))
            }
        }
    }
    Ok(text)
}

fn logprobs(ctx: &Ctx, tokens: &[TokenInfo]) -> ChatLogprobs {
    let entry = |id: u32, logprob: f32| {
        let token = ctx.token_text(id);
        TopLogprob {
            bytes: token.clone().into_bytes(),
            token,
            logprob,
        }
    };
    ChatLogprobs {
        content: tokens
            .iter()
            .map(|t| {
                let e = entry(t.id, t.logprob);
                ChatTokenLogprob {
                    token: e.token,
                    logprob: e.logprob,
                    bytes: e.bytes,
                    top_logprobs: t
                        .top_logprobs
                        .iter()
                        .map(|&(id, lp)| entry(id, lp))
                        .collect(),
                }
            })
            .collect(),
    }
}

pub async fn chat_completions(ctx: Ctx, body: axum::body::Bytes) -> Result<Response, ApiError> {
    let mut req: ChatCompletionRequest = parse_json(&body)?;
    let adapter = ctx.resolve_model(&req.model)?;
    let want_logprobs = req.logprobs.unwrap_or(false);
    let top = match req.top_logprobs {
        None => 0,
        Some(k) if (0..=20).contains(&k) => k as usize,
        Some(k) => {
            return Err(ApiError::bad_request(
                Some("top_logprobs"),
                format!("`top_logprobs` must be between 0 and 20, got {k}"),
            ))
        }
    };
    if req.top_logprobs.is_some() && !want_logprobs {
        return Err(ApiError::bad_request(
            Some("top_logprobs"),
            "`top_logprobs` requires `logprobs: true`",
        ));
    }
    let messages = messages(&mut req)?;
    let opts = generation::Options {
        adapter,
        ..generation::options(
            std::mem::take(&mut req.sampling),
            want_logprobs.then_some(top),
        )?
    };
    let engine = ctx.engine()?;
    let streams =
        generation::submit_all(&engine, generation::choices(Prompt::Chat(messages), &opts)).await?;
    let id = format!("chatcmpl-{}", ctx.new_id());
    let created = crate::app::unix_now();
    let model = req.model;

    if !opts.stream {
        let choices = generation::collect_all(streams).await?;
        let prompt_tokens = choices.first().map_or(0, |c| c.num_prompt_tokens);
        let completion_tokens = choices.iter().map(|c| c.tokens.len()).sum();
        let body = json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": crate::app::FINGERPRINT,
            "choices": choices.iter().enumerate().map(|(i, c)| json!({
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": want_logprobs.then(|| logprobs(&ctx, &c.tokens)),
                "finish_reason": finish_reason(c.finish_reason),
            })).collect::<Vec<_>>(),
            "usage": Usage::new(prompt_tokens, completion_tokens),
        });
        return Ok(axum::Json(body).into_response());
    }

    let spec = generation::StreamSpec {
        events: generation::forward_all(streams),
        num_choices: opts.n,
        n: opts.n,
        include_usage: opts.include_usage,
        preamble: (0..opts.n)
            .map(|i| json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}))
            .collect(),
        chunk: move |choices: serde_json::Value, usage: Option<Usage>| {
            let mut c = json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": crate::app::FINGERPRINT, "choices": choices,
            });
            if opts.include_usage {
                c["usage"] = json!(usage);
            }
            Event::default().data(c.to_string())
        },
    };
    let sse = generation::stream_choices(spec, move |index, out| {
        if out.text.is_empty() && out.finish_reason.is_none() && !want_logprobs {
            return None;
        }
        let delta = if out.text.is_empty() {
            json!({})
        } else {
            json!({"content": out.text})
        };
        Some(json!({
            "index": index,
            "delta": delta,
            "logprobs": want_logprobs.then(|| logprobs(&ctx, &out.tokens)),
            "finish_reason": out.finish_reason.map(finish_reason),
        }))
    });
    Ok(sse.into_response())
}
