//! What chat and completions share: OpenAI sampling fields → engine parameters, submitting the
//! `n` choices, collecting or streaming them, and per-request metrics.
use std::time::Instant;

use pagoda_engine::sampling_params::MAX_TOKENS_AUTO;
use pagoda_engine::{
    EngineError, EngineHandle, FinishReason, GenerateRequest, RequestStream, SamplingParams,
    StreamOutput, TokenInfo,
};
use std::convert::Infallible;

use axum::response::sse::{Event, Sse};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::metrics::METRICS;
use crate::openai::{SamplingFields, Usage};

/// Most choices per request.
pub const MAX_N: usize = 16;

/// The parsed request-level options.
pub struct Options {
    pub params: SamplingParams,
    pub stop: Vec<String>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    pub skip_special_tokens: bool,
    /// The LoRA adapter the `model` field named, if not the base model.
    pub adapter: Option<String>,
}

fn non_negative(param: &str, v: i64) -> Result<usize, ApiError> {
    usize::try_from(v).map_err(|_| {
        ApiError::bad_request(
            Some(param),
            format!("`{param}` must be a non-negative integer, got {v}"),
        )
    })
}

/// Checks the OpenAI-level fields (ranges that need JSON knowledge, like `n` and `logit_bias`
/// keys); the engine's validator checks the rest.
pub fn options(f: SamplingFields, logprobs: Option<usize>) -> Result<Options, ApiError> {
    let n = match f.n {
        None => 1,
        Some(n) if (1..=MAX_N as i64).contains(&n) => n as usize,
        Some(n) => {
            return Err(ApiError::bad_request(
                Some("n"),
                format!("`n` must be between 1 and {MAX_N}, got {n}"),
            ))
        }
    };
    let max_tokens = match f.max_completion_tokens.or(f.max_tokens) {
        None => MAX_TOKENS_AUTO,
        Some(v) if v >= 1 => v as usize,
        Some(v) => {
            return Err(ApiError::bad_request(
                Some("max_tokens"),
                format!("`max_tokens` must be at least 1, got {v}"),
            ))
        }
    };
    let top_k = match f.top_k {
        None | Some(-1) => 0,
        Some(k) => non_negative("top_k", k)?,
    };
    let mut logit_bias = Vec::new();
    for (k, v) in f.logit_bias.unwrap_or_default() {
        let id = k.parse::<u32>().map_err(|_| {
            ApiError::bad_request(
                Some("logit_bias"),
                format!("`logit_bias` keys must be token ids, got {k:?}"),
            )
        })?;
        logit_bias.push((id, v));
    }
    logit_bias.sort_by_key(|&(id, _)| id);
    let seed = f.seed.map(|s| s as u64);
    let stream = f.stream.unwrap_or(false);
    if f.stream_options.is_some() && !stream {
        return Err(ApiError::bad_request(
            Some("stream_options"),
            "`stream_options` is only allowed when `stream` is true",
        ));
    }
    let params = SamplingParams {
        temperature: f.temperature.unwrap_or(1.0),
        top_k,
        top_p: f.top_p.unwrap_or(1.0),
        min_p: f.min_p.unwrap_or(0.0),
        repetition_penalty: f.repetition_penalty.unwrap_or(1.0),
        presence_penalty: f.presence_penalty.unwrap_or(0.0),
        frequency_penalty: f.frequency_penalty.unwrap_or(0.0),
        logit_bias,
        seed,
        max_tokens,
        min_tokens: f
            .min_tokens
            .map(|v| non_negative("min_tokens", v))
            .transpose()?
            .unwrap_or(0),
        stop_token_ids: f.stop_token_ids.unwrap_or_default(),
        ignore_eos: f.ignore_eos.unwrap_or(false),
        logprobs,
    };
    Ok(Options {
        params,
        stop: f.stop.map(|s| s.into_vec()).unwrap_or_default(),
        n,
        stream,
        include_usage: f.stream_options.is_some_and(|o| o.include_usage),
        skip_special_tokens: f.skip_special_tokens.unwrap_or(true),
        adapter: None,
    })
}

/// The engine requests for `n` choices of one prompt: seeded choices get consecutive seeds so
/// they differ but stay reproducible.
pub fn choices(prompt: pagoda_engine::Prompt, opts: &Options) -> Vec<GenerateRequest> {
    (0..opts.n)
        .map(|i| {
            let mut params = opts.params.clone();
            params.seed = params.seed.map(|s| s.wrapping_add(i as u64));
            GenerateRequest {
                prompt: prompt.clone(),
                params,
                stop: opts.stop.clone(),
                skip_special_tokens: opts.skip_special_tokens,
                adapter: opts.adapter.clone(),
            }
        })
        .collect()
}

/// Submits every request or none (the submitted ones are aborted when one fails).
pub async fn submit_all(
    engine: &EngineHandle,
    requests: Vec<GenerateRequest>,
) -> Result<Vec<RequestStream>, ApiError> {
    let mut streams = Vec::with_capacity(requests.len());
    for r in requests {
        streams.push(engine.submit(r).await?);
    }
    Ok(streams)
}

/// One finished choice.
pub struct Choice {
    pub text: String,
    pub tokens: Vec<TokenInfo>,
    pub finish_reason: FinishReason,
    pub num_prompt_tokens: usize,
}

/// Timing of one request for the latency histograms.
struct Timer {
    start: Instant,
    first: Option<Instant>,
    num_tokens: usize,
}

impl Timer {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            first: None,
            num_tokens: 0,
        }
    }

    fn on_output(&mut self, out: &StreamOutput, num_prompt_tokens: usize) {
        if !out.tokens.is_empty() && self.first.is_none() {
            let now = Instant::now();
            METRICS.ttft.observe((now - self.start).as_secs_f64());
            self.first = Some(now);
        }
        self.num_tokens += out.tokens.len();
        METRICS.generation_tokens.inc_by(out.tokens.len() as u64);
        if let Some(reason) = out.finish_reason {
            let now = Instant::now();
            METRICS.e2e.observe((now - self.start).as_secs_f64());
            if let Some(first) = self.first {
                if self.num_tokens > 1 {
                    METRICS
                        .tpot
                        .observe((now - first).as_secs_f64() / (self.num_tokens - 1) as f64);
                }
            }
            METRICS.prompt_tokens.inc_by(num_prompt_tokens as u64);
            METRICS.finished.with_label_values(&[reason.as_str()]).inc();
        }
    }
}

/// Runs every stream to the end, concurrently.
pub async fn collect_all(streams: Vec<RequestStream>) -> Result<Vec<Choice>, ApiError> {
    let tasks = streams.into_iter().map(|mut stream| async move {
        let mut timer = Timer::new();
        let num_prompt_tokens = stream.num_prompt_tokens();
        let mut choice = Choice {
            text: String::new(),
            tokens: Vec::new(),
            finish_reason: FinishReason::Abort,
            num_prompt_tokens,
        };
        while let Some(out) = stream.next().await {
            let out = out?;
            timer.on_output(&out, num_prompt_tokens);
            choice.text.push_str(&out.text);
            choice.tokens.extend(out.tokens);
            if let Some(r) = out.finish_reason {
                choice.finish_reason = r;
            }
        }
        Ok::<_, EngineError>(choice)
    });
    let results = futures::future::join_all(tasks).await;
    results
        .into_iter()
        .map(|r| r.map_err(ApiError::from))
        .collect()
}

/// One event of a streamed choice.
pub struct ChoiceEvent {
    pub index: usize,
    pub output: Result<StreamOutput, EngineError>,
    pub num_prompt_tokens: usize,
}

/// Forwards every stream's outputs into one channel, tagged with the choice index. When the
/// receiver goes away (client disconnected), the forwarders drop their streams, which aborts
/// the requests.
pub fn forward_all(streams: Vec<RequestStream>) -> mpsc::Receiver<ChoiceEvent> {
    let (tx, rx) = mpsc::channel(64);
    for (index, mut stream) in streams.into_iter().enumerate() {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut timer = Timer::new();
            let num_prompt_tokens = stream.num_prompt_tokens();
            loop {
                let next = tokio::select! {
                    next = stream.next() => next,
                    _ = tx.closed() => break,
                };
                let Some(output) = next else { break };
                if let Ok(out) = &output {
                    timer.on_output(out, num_prompt_tokens);
                }
                if tx
                    .send(ChoiceEvent {
                        index,
                        output,
                        num_prompt_tokens,
                    })
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
    }
    rx
}

/// How to stream a request's choices as SSE.
pub struct StreamSpec<C> {
    pub events: mpsc::Receiver<ChoiceEvent>,
    pub num_choices: usize,
    /// Choices per prompt: each prompt's tokens count once in the usage.
    pub n: usize,
    pub include_usage: bool,
    /// `choices` entries sent before any output (chat's role deltas), one chunk each.
    pub preamble: Vec<Value>,
    /// Wraps a `choices` array (and the usage) in the endpoint's chunk object.
    pub chunk: C,
}

/// Streams choices as SSE: the preamble, one chunk per event that `choice` turns into a
/// `choices` entry, then the usage chunk when asked and `[DONE]`. When the client goes away the
/// next send fails, the task ends, and the requests are aborted.
pub fn stream_choices<C, J>(
    spec: StreamSpec<C>,
    mut choice: J,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>>
where
    C: Fn(Value, Option<Usage>) -> Event + Send + 'static,
    J: FnMut(usize, &StreamOutput) -> Option<Value> + Send + 'static,
{
    let StreamSpec {
        mut events,
        num_choices,
        n,
        include_usage,
        preamble,
        chunk,
    } = spec;
    Sse::new(event_stream(move |tx| async move {
        for entry in preamble {
            if tx.send(chunk(json!([entry]), None)).await.is_err() {
                return;
            }
        }
        let mut prompt_tokens = vec![0; num_choices];
        let mut completion_tokens = 0;
        let mut open = num_choices;
        while let Some(ev) = events.recv().await {
            prompt_tokens[ev.index] = ev.num_prompt_tokens;
            let out = match ev.output {
                Ok(out) => out,
                Err(e) => {
                    let _ = tx
                        .send(Event::default().data(ApiError::from(e).body().to_string()))
                        .await;
                    return;
                }
            };
            completion_tokens += out.tokens.len();
            if let Some(entry) = choice(ev.index, &out) {
                if tx.send(chunk(json!([entry]), None)).await.is_err() {
                    return;
                }
            }
            if out.finish_reason.is_some() {
                open -= 1;
                if open == 0 {
                    break;
                }
            }
        }
        if include_usage {
            let prompt: usize = prompt_tokens.iter().step_by(n.max(1)).sum();
            let _ = tx
                .send(chunk(
                    json!([]),
                    Some(Usage::new(prompt, completion_tokens)),
                ))
                .await;
        }
        let _ = tx.send(Event::default().data("[DONE]")).await;
    }))
}

/// SSE events produced by a task; when the client goes, the next send fails and the task ends.
fn event_stream<F, Fut>(f: F) -> impl futures::Stream<Item = Result<Event, Infallible>>
where
    F: FnOnce(mpsc::Sender<Event>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok)
}

/// `finish_reason` as OpenAI spells it.
pub fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Abort => "abort",
    }
}
