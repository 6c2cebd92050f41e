//! Continuous batching as token bookkeeping: each step hands out a token budget, running
//! requests first (a decode costs one token, an unfinished prompt a chunk of it), then waiting
//! requests in queue order. When the KV pool runs dry the newest running request is preempted
//! (its blocks freed; it recomputes later). The scheduler never touches a tensor.
use std::collections::{HashMap, HashSet, VecDeque};

use crate::kv::KvCacheManager;
use crate::request::{FinishReason, Request, RequestId, RequestStatus};
use crate::sampler::SampledToken;

/// Per-step limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most tokens computed in one step (prompt chunks + decodes).
    pub max_num_batched_tokens: usize,
    /// Most requests in one step.
    pub max_num_seqs: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_num_batched_tokens: 512,
            max_num_seqs: 64,
        }
    }
}

/// Order of the waiting requests. FCFS now; priorities plug in here.
pub trait RequestQueue: Send {
    fn push_back(&mut self, id: RequestId);
    /// A preempted request goes back to the front.
    fn push_front(&mut self, id: RequestId);
    fn peek(&self) -> Option<RequestId>;
    fn pop(&mut self) -> Option<RequestId>;
    fn remove(&mut self, id: RequestId) -> bool;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Default)]
pub struct FcfsQueue(VecDeque<RequestId>);

impl RequestQueue for FcfsQueue {
    fn push_back(&mut self, id: RequestId) {
        self.0.push_back(id);
    }
    fn push_front(&mut self, id: RequestId) {
        self.0.push_front(id);
    }
    fn peek(&self) -> Option<RequestId> {
        self.0.front().copied()
    }
    fn pop(&mut self) -> Option<RequestId> {
        self.0.pop_front()
    }
    fn remove(&mut self, id: RequestId) -> bool {
        let before = self.0.len();
        self.0.retain(|&x| x != id);
        before != self.0.len()
    }
    fn len(&self) -> usize {
        self.0.len()
    }
}

/// One request's share of a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduledRequest {
    pub id: RequestId,
    /// Tokens `num_computed_tokens..num_computed_tokens + num_new_tokens` run this step.
    pub num_computed_tokens: usize,
    pub num_new_tokens: usize,
    /// The step reaches the request's last token, so it samples the next.
    pub samples: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SchedulerOutput {
    pub scheduled: Vec<ScheduledRequest>,
    pub preempted: Vec<RequestId>,
    pub num_batched_tokens: usize,
}

impl SchedulerOutput {
    pub fn is_empty(&self) -> bool {
        self.scheduled.is_empty()
    }
}

/// What a step did to one request.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestOutput {
    pub id: RequestId,
    pub token: SampledToken,
    pub finish: Option<FinishReason>,
}

pub struct Scheduler {
    config: SchedulerConfig,
    kv: KvCacheManager,
    requests: HashMap<RequestId, Request>,
    waiting: Box<dyn RequestQueue>,
    running: Vec<RequestId>,
    eos_token_ids: Vec<u32>,
    num_preemptions: u64,
    /// Most distinct LoRA adapters among the running requests (the model's device slots).
    max_loras: usize,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig, kv: KvCacheManager, eos_token_ids: Vec<u32>) -> Self {
        Self::with_queue(config, kv, eos_token_ids, Box::<FcfsQueue>::default())
    }

    pub fn with_queue(
        config: SchedulerConfig,
        kv: KvCacheManager,
        eos_token_ids: Vec<u32>,
        waiting: Box<dyn RequestQueue>,
    ) -> Self {
        assert!(
            config.max_num_batched_tokens > 0 && config.max_num_seqs > 0,
            "scheduler budgets must be positive"
        );
        Self {
            config,
            kv,
            requests: HashMap::new(),
            waiting,
            running: Vec::new(),
            eos_token_ids,
            num_preemptions: 0,
            max_loras: 0,
        }
    }

    /// Lets requests with adapters run, at most `n` distinct adapters at a time.
    pub fn set_max_loras(&mut self, n: usize) {
        self.max_loras = n;
    }

    pub fn kv(&self) -> &KvCacheManager {
        &self.kv
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_preemptions(&self) -> u64 {
        self.num_preemptions
    }

    pub fn has_work(&self) -> bool {
        !self.requests.is_empty()
    }

    pub fn request(&self, id: RequestId) -> Option<&Request> {
        self.requests.get(&id)
    }

    pub fn request_mut(&mut self, id: RequestId) -> Option<&mut Request> {
        self.requests.get_mut(&id)
    }

    /// Queues a request. The caller made sure it fits the pool and the context on its own.
    pub fn add(&mut self, request: Request) {
        let id = request.id;
        debug_assert!(!self.requests.contains_key(&id), "request id reused");
        debug_assert!(
            request.adapter.is_none() || self.max_loras > 0,
            "an adapter request without LoRA slots would never run"
        );
        self.requests.insert(id, request);
        self.waiting.push_back(id);
    }

    /// Removes a request wherever it is and frees its blocks. `false` when unknown (finished).
    pub fn abort(&mut self, id: RequestId) -> bool {
        if self.requests.remove(&id).is_none() {
            return false;
        }
        self.waiting.remove(id);
        self.running.retain(|&r| r != id);
        self.kv.free(id);
        true
    }

    fn preempt(&mut self, id: RequestId) {
        self.kv.free(id);
        self.running.retain(|&r| r != id);
        let req = self.requests.get_mut(&id).expect("running request exists");
        req.num_computed_tokens = 0;
        req.status = RequestStatus::Waiting;
        req.num_preemptions += 1;
        self.num_preemptions += 1;
        self.waiting.push_front(id);
    }

    /// Picks this step's tokens.
    pub fn schedule(&mut self) -> SchedulerOutput {
        let mut out = SchedulerOutput::default();
        let mut budget = self.config.max_num_batched_tokens;

        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let req = &self.requests[&id];
            let num_new = (req.num_tokens() - req.num_computed_tokens).min(budget);
            let target = req.num_computed_tokens + num_new;
            let mut fits = true;
            while !self.kv.allocate_slots(id, target) {
                // Preempt the newest running request; if that is this one, it waits.
                let victim = *self.running.last().expect("running is not empty");
                self.preempt(victim);
                out.preempted.push(victim);
                if victim == id {
                    fits = false;
                    break;
                }
            }
            if !fits {
                break;
            }
            let req = &self.requests[&id];
            out.scheduled.push(ScheduledRequest {
                id,
                num_computed_tokens: req.num_computed_tokens,
                num_new_tokens: num_new,
                samples: target == req.num_tokens(),
            });
            budget -= num_new;
            i += 1;
        }

        // New requests only when nobody had to make room this step. Those whose adapter would
        // exceed the LoRA slots wait (in order) for a running adapter to finish.
        let mut adapters: HashSet<_> = self
            .running
            .iter()
            .filter_map(|id| self.requests[id].adapter_id())
            .collect();
        let mut skipped = Vec::new();
        while out.preempted.is_empty()
            && budget > 0
            && self.running.len() < self.config.max_num_seqs
        {
            let Some(id) = self.waiting.peek() else { break };
            let req = &self.requests[&id];
            if let Some(a) = req.adapter_id() {
                if !adapters.contains(&a) && adapters.len() >= self.max_loras {
                    self.waiting.pop();
                    skipped.push(id);
                    continue;
                }
                adapters.insert(a);
            }
            let num_new = (req.num_tokens() - req.num_computed_tokens).min(budget);
            let target = req.num_computed_tokens + num_new;
            if !self.kv.allocate_slots(id, target) {
                break;
            }
            self.waiting.pop();
            let req = self.requests.get_mut(&id).expect("waiting request exists");
            req.status = RequestStatus::Running;
            out.scheduled.push(ScheduledRequest {
                id,
                num_computed_tokens: req.num_computed_tokens,
                num_new_tokens: num_new,
                samples: target == req.num_tokens(),
            });
            self.running.push(id);
            budget -= num_new;
        }
        for id in skipped.into_iter().rev() {
            self.waiting.push_front(id);
        }
        out.num_batched_tokens = self.config.max_num_batched_tokens - budget;
        out
    }

    /// Applies a step's results: advances computed tokens, appends sampled tokens, finishes
    /// requests (freeing their blocks). `sampled` holds one token per request that sampled.
    pub fn update(
        &mut self,
        out: &SchedulerOutput,
        sampled: Vec<(RequestId, SampledToken)>,
    ) -> Vec<RequestOutput> {
        for s in &out.scheduled {
            if let Some(req) = self.requests.get_mut(&s.id) {
                req.num_computed_tokens = s.num_computed_tokens + s.num_new_tokens;
            }
        }
        let mut outputs = Vec::with_capacity(sampled.len());
        for (id, token) in sampled {
            let Some(req) = self.requests.get_mut(&id) else {
                continue;
            };
            req.output_tokens.push(token.token);
            let num_out = req.output_tokens.len();
            let is_eos = !req.params.ignore_eos && self.eos_token_ids.contains(&token.token);
            let finish = if (is_eos || req.params.stop_token_ids.contains(&token.token))
                && num_out >= req.params.min_tokens
            {
                Some(FinishReason::Stop)
            } else if req.num_tokens() >= req.max_total_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            if finish.is_some() {
                self.requests.remove(&id);
                self.running.retain(|&r| r != id);
                self.kv.free(id);
            }
            outputs.push(RequestOutput { id, token, finish });
        }
        outputs
    }
}

#[cfg(test)]
mod tests;
