//! The engine thread and the `Clone` handle everyone else uses. Requests go in through a
//! channel; each gets an unbounded event channel back. The thread owns all step state; a
//! closed event channel (client gone) aborts its request before the next step.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

use pagoda_adapters::{AdapterError, AdapterRegistry, LoraAdapter};
use pagoda_models::LoadedModel;
use tokio::sync::{mpsc as tmpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::engine::{Engine, EngineConfig, EngineStats};
use crate::request::{FinishReason, Request, RequestId};
use crate::sampler::SampledToken;
use crate::stream::RequestStream;
use crate::validate::{GenerateRequest, ValidRequest, Validator};
use crate::{EngineError, SamplingParams};

/// What the engine thread tells a request's stream.
#[derive(Debug)]
pub enum EngineEvent {
    Token(SampledToken, Option<FinishReason>),
    /// The step failed; the request is gone.
    Error(String),
    /// The engine shut down before the request finished.
    Aborted,
}

enum Command {
    Add {
        request: Box<Request>,
        events: tmpsc::UnboundedSender<EngineEvent>,
    },
    Abort(RequestId),
    Stats(oneshot::Sender<EngineStats>),
    Shutdown,
}

/// Facts about the served model that the edge needs.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub name: String,
    pub max_context_len: usize,
    pub vocab_size: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    pub has_chat_template: bool,
}

struct Inner {
    commands: mpsc::Sender<Command>,
    validator: Validator,
    next_id: AtomicU64,
    permits: Arc<Semaphore>,
    max_waiting: usize,
    info: ModelInfo,
    /// `None` when the engine runs without LoRA slots.
    adapters: Option<Arc<AdapterRegistry>>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Cheap to clone; all clones talk to the same engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    inner: Arc<Inner>,
}

impl EngineHandle {
    /// Builds the engine for `loaded`, runs a warm-up step and starts the engine thread.
    pub fn start(loaded: LoadedModel, config: EngineConfig) -> Result<Self, EngineError> {
        let LoadedModel {
            model,
            tokenizer,
            name,
            ..
        } = loaded;
        let max_context_len = model.max_context_len();
        let vocab_size = model.vocab_size();
        let mut engine = Engine::new(model, &config, tokenizer.eos_token_ids.clone())?;
        let adapters = config.lora.map(|limits| {
            let shapes = engine.model().lora_shapes();
            Arc::new(AdapterRegistry::new(shapes, limits, vec![name.clone()]))
        });
        warm_up(&mut engine)?;
        let stats = engine.stats();
        let info = ModelInfo {
            name,
            max_context_len,
            vocab_size,
            num_blocks: stats.num_blocks,
            block_size: stats.block_size,
            has_chat_template: tokenizer.chat_template.is_some(),
        };
        let validator = Validator {
            tokenizer: Arc::new(tokenizer),
            vocab_size,
            max_context_len,
            max_pool_tokens: stats.num_blocks * stats.block_size,
        };
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("pagoda-engine".into())
            .spawn(move || run(engine, rx))
            .map_err(|e| EngineError::Config(format!("cannot start the engine thread: {e}")))?;
        let in_flight = config.scheduler.max_num_seqs + config.max_waiting;
        Ok(Self {
            inner: Arc::new(Inner {
                commands: tx,
                validator,
                next_id: AtomicU64::new(1),
                permits: Arc::new(Semaphore::new(in_flight)),
                max_waiting: config.max_waiting,
                info,
                adapters,
                thread: std::sync::Mutex::new(Some(thread)),
            }),
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.inner.info
    }

    /// The LoRA adapter registry, when the engine has LoRA slots.
    pub fn adapters(&self) -> Option<&Arc<AdapterRegistry>> {
        self.inner.adapters.as_ref()
    }

    fn resolve_adapter(&self, name: &str) -> Result<Arc<LoraAdapter>, EngineError> {
        let registry = self
            .inner
            .adapters
            .as_ref()
            .ok_or_else(|| AdapterError::NotFound(name.to_string()))?;
        Ok(registry.resolve(name)?)
    }

    pub fn tokenizer(&self) -> &Arc<pagoda_models::tokenizer::ModelTokenizer> {
        &self.inner.validator.tokenizer
    }

    /// Validates (tokenizing off the async runtime) and queues a request. `QueueFull` when too
    /// many are in flight.
    pub async fn submit(&self, request: GenerateRequest) -> Result<RequestStream, EngineError> {
        // The request holds the generation it resolves now, whatever happens to the name later.
        let adapter = match &request.adapter {
            Some(name) => Some(self.resolve_adapter(name)?),
            None => None,
        };
        let permit = self.acquire()?;
        let this = self.clone();
        let valid = tokio::task::spawn_blocking(move || this.inner.validator.validate(request))
            .await
            .map_err(|_| EngineError::Unavailable)??;
        self.enqueue(valid, permit, adapter)
    }

    fn acquire(&self) -> Result<OwnedSemaphorePermit, EngineError> {
        self.inner
            .permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| EngineError::QueueFull(self.inner.max_waiting))
    }

    fn enqueue(
        &self,
        valid: ValidRequest,
        permit: OwnedSemaphorePermit,
        adapter: Option<Arc<LoraAdapter>>,
    ) -> Result<RequestStream, EngineError> {
        let id = RequestId(self.inner.next_id.fetch_add(1, Ordering::Relaxed));
        let (prompt_tokens, params, stop, skip_special) = valid.into_parts();
        let (tx, rx) = tmpsc::unbounded_channel();
        let tail_from = prompt_tokens.len().saturating_sub(4);
        let stream = RequestStream::new(
            id,
            rx,
            self.clone(),
            permit,
            &prompt_tokens[tail_from..],
            prompt_tokens.len(),
            stop,
            skip_special,
        );
        let mut request = Request::new(id, prompt_tokens, params, self.inner.info.max_context_len);
        request.adapter = adapter;
        self.inner
            .commands
            .send(Command::Add {
                request: Box::new(request),
                events: tx,
            })
            .map_err(|_| EngineError::Unavailable)?;
        Ok(stream)
    }

    /// Stops the request and frees its blocks (no-op when finished).
    pub fn abort(&self, id: RequestId) {
        let _ = self.inner.commands.send(Command::Abort(id));
    }

    pub async fn stats(&self) -> Result<EngineStats, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .commands
            .send(Command::Stats(tx))
            .map_err(|_| EngineError::Unavailable)?;
        rx.await.map_err(|_| EngineError::Unavailable)
    }

    /// Aborts everything in flight and joins the engine thread.
    pub fn shutdown(&self) {
        let _ = self.inner.commands.send(Command::Shutdown);
        let thread = self.inner.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

/// One tiny generation so the first real request doesn't pay for first-touch costs, and so a
/// broken model fails at start rather than on a user's request.
fn warm_up(engine: &mut Engine) -> Result<(), EngineError> {
    let params = SamplingParams {
        max_tokens: 2,
        ignore_eos: true,
        ..Default::default()
    };
    engine.add(Request::new(RequestId(0), vec![0; 4], params, usize::MAX));
    while engine.has_work() {
        engine.step().map_err(|(_, e)| e)?;
    }
    Ok(())
}

fn run(mut engine: Engine, commands: mpsc::Receiver<Command>) {
    let mut senders: HashMap<RequestId, tmpsc::UnboundedSender<EngineEvent>> = HashMap::new();
    loop {
        // Sleep on the channel while idle; otherwise take what's there and step.
        if !engine.has_work() {
            match commands.recv() {
                Ok(cmd) => {
                    if !apply(cmd, &mut engine, &mut senders) {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        let mut shutdown = false;
        while let Ok(cmd) = commands.try_recv() {
            if !apply(cmd, &mut engine, &mut senders) {
                shutdown = true;
                break;
            }
        }
        if shutdown {
            break;
        }
        senders.retain(|&id, tx| {
            let gone = tx.is_closed();
            if gone {
                engine.abort(id);
            }
            !gone
        });
        match engine.step() {
            Ok(outputs) => {
                for o in outputs {
                    let finished = o.finish.is_some();
                    let delivered = senders
                        .get(&o.id)
                        .is_some_and(|tx| tx.send(EngineEvent::Token(o.token, o.finish)).is_ok());
                    if !delivered && !finished {
                        engine.abort(o.id);
                    }
                    if finished || !delivered {
                        senders.remove(&o.id);
                    }
                }
            }
            Err((ids, e)) => {
                tracing::error!(error = %e, num_requests = ids.len(), "engine step failed; its requests are aborted");
                for id in ids {
                    if let Some(tx) = senders.remove(&id) {
                        let _ = tx.send(EngineEvent::Error(e.to_string()));
                    }
                }
            }
        }
    }
    // Shutdown: whoever is still waiting learns the request ended.
    for (id, tx) in senders.drain() {
        engine.abort(id);
        let _ = tx.send(EngineEvent::Aborted);
    }
}

/// Applies a command; `false` means shut down.
fn apply(
    cmd: Command,
    engine: &mut Engine,
    senders: &mut HashMap<RequestId, tmpsc::UnboundedSender<EngineEvent>>,
) -> bool {
    match cmd {
        Command::Add { request, events } => {
            senders.insert(request.id, events);
            engine.add(*request);
        }
        Command::Abort(id) => {
            engine.abort(id);
            senders.remove(&id);
        }
        Command::Stats(reply) => {
            let _ = reply.send(engine.stats());
        }
        Command::Shutdown => return false,
    }
    true
}
