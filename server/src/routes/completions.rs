//! `POST /v1/completions`.
use std::collections::HashMap;

use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use pagoda_engine::{Prompt, TokenInfo};
use serde_json::{json, Value};

use crate::app::{parse_json, Ctx};
use crate::error::ApiError;
use crate::generation::{self, finish_reason};
use crate::openai::{CompletionLogprobs, CompletionRequest, Usage};

/// Most prompts in one request.
pub const MAX_PROMPTS: usize = 64;

fn prompts(v: &Value) -> Result<Vec<Prompt>, ApiError> {
    let bad = || {
        ApiError::bad_request(
            Some("prompt"),
            "`prompt` must be a string, a list of strings, a list of token ids or a list of lists of token ids",
        )
    };
    let tokens = |v: &Value| -> Option<Vec<u32>> {
        v.as_array()?
            .iter()
            .map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()))
            .collect()
    };
    let out = match v {
        Value::String(s) => vec![Prompt::Text(s.clone())],
        Value::Array(items) if items.is_empty() => return Err(bad()),
        Value::Array(items) if items.iter().all(Value::is_string) => items
            .iter()
            .map(|s| Prompt::Text(s.as_str().unwrap_or_default().to_string()))
            .collect(),
        Value::Array(items) if items.iter().all(Value::is_number) => {
            vec![Prompt::Tokens(tokens(v).ok_or_else(bad)?)]
        }
        Value::Array(items) if items.iter().all(Value::is_array) => items
            .iter()
            .map(|x| tokens(x).map(Prompt::Tokens).ok_or_else(bad))
            .collect::<Result<_, _>>()?,
        _ => return Err(bad()),
    };
    if out.len() > MAX_PROMPTS {
        return Err(ApiError::bad_request(
            Some("prompt"),
            format!("at most {MAX_PROMPTS} prompts per request"),
        ));
    }
    Ok(out)
}

fn logprobs(ctx: &Ctx, tokens: &[TokenInfo], text_start: usize) -> CompletionLogprobs {
    let mut lp = CompletionLogprobs::default();
    let mut offset = text_start;
    for t in tokens {
        let text = ctx.token_text(t.id);
        lp.text_offset.push(offset);
        offset += text.len();
        lp.tokens.push(text);
        lp.token_logprobs.push(t.logprob);
        let top: HashMap<String, f32> = t
            .top_logprobs
            .iter()
            .map(|&(id, l)| (ctx.token_text(id), l))
            .collect();
        lp.top_logprobs.push(top);
    }
    lp
}

pub async fn completions(ctx: Ctx, body: axum::body::Bytes) -> Result<Response, ApiError> {
    let mut req: CompletionRequest = parse_json(&body)?;
    let adapter = ctx.resolve_model(&req.model)?;
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad_request(
            Some("suffix"),
            "`suffix` (fill-in-the-middle) is not supported by this model",
        ));
    }
    let top = match req.logprobs {
        None => None,
        Some(k) if (0..=20).contains(&k) => Some(k as usize),
        Some(k) => {
            return Err(ApiError::bad_request(
                Some("logprobs"),
                format!("`logprobs` must be between 0 and 20, got {k}"),
            ))
        }
    };
    let echo = req.echo.unwrap_or(false);
    let prompts = prompts(&req.prompt)?;
    let opts = generation::Options {
        adapter,
        ..generation::options(std::mem::take(&mut req.sampling), top)?
    };
    if opts.stream && echo {
        return Err(ApiError::bad_request(
            Some("echo"),
            "`echo` is not supported with `stream`",
        ));
    }
    let engine = ctx.engine()?;
    let mut echoes = Vec::new();
    let mut requests = Vec::new();
    for p in prompts {
        if echo {
            let text = match &p {
                Prompt::Text(t) => t.clone(),
                Prompt::Tokens(ids) => engine.tokenizer().decode(ids, false).unwrap_or_default(),
                Prompt::Chat(_) => String::new(),
            };
            echoes.extend(std::iter::repeat_n(text, opts.n));
        }
        requests.extend(generation::choices(p, &opts));
    }
    let streams = generation::submit_all(&engine, requests).await?;
    let id = format!("cmpl-{}", ctx.new_id());
    let created = crate::app::unix_now();
    let model = req.model;

    if !opts.stream {
        let choices = generation::collect_all(streams).await?;
        // Each prompt counts once, not once per choice.
        let prompt_tokens: usize = choices
            .iter()
            .step_by(opts.n)
            .map(|c| c.num_prompt_tokens)
            .sum();
        let completion_tokens = choices.iter().map(|c| c.tokens.len()).sum();
        let body = json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": crate::app::FINGERPRINT,
            "choices": choices.iter().enumerate().map(|(i, c)| {
                let prefix = echoes.get(i).map_or("", String::as_str);
                json!({
                    "index": i,
                    "text": format!("{prefix}{}", c.text),
                    "logprobs": top.map(|_| logprobs(&ctx, &c.tokens, prefix.len())),
                    "finish_reason": finish_reason(c.finish_reason),
                })
            }).collect::<Vec<_>>(),
            "usage": Usage::new(prompt_tokens, completion_tokens),
        });
        return Ok(axum::Json(body).into_response());
    }

    let num_choices = streams.len();
    let spec = generation::StreamSpec {
        events: generation::forward_all(streams),
        num_choices,
        n: opts.n,
        include_usage: opts.include_usage,
        preamble: Vec::new(),
        chunk: move |choices: Value, usage: Option<Usage>| {
            let mut c = json!({
                "id": id, "object": "text_completion", "created": created, "model": model,
                "system_fingerprint": crate::app::FINGERPRINT, "choices": choices,
            });
            if opts.include_usage {
                c["usage"] = json!(usage);
            }
            Event::default().data(c.to_string())
        },
    };
    // Text offsets of each choice, for the logprobs' `text_offset`.
    let mut offsets = vec![0; num_choices];
    let sse = generation::stream_choices(spec, move |index, out| {
        let lp = top.map(|_| logprobs(&ctx, &out.tokens, offsets[index]));
        offsets[index] += out.text.len();
        if out.text.is_empty() && out.finish_reason.is_none() && lp.is_none() {
            return None;
        }
        Some(
            json!({"index": index, "text": out.text, "logprobs": lp, "finish_reason": out.finish_reason.map(finish_reason)}),
        )
    });
    Ok(sse.into_response())
}
