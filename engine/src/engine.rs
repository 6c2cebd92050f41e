//! The engine proper: model, KV cache and scheduler, owned by one thread. `step()` is
//! schedule → execute → update and nothing else.
use pagoda_adapters::{AdapterLimits, AdapterSlots};
use pagoda_models::{Model, PagedKvCache};

use crate::kv::KvCacheManager;
use crate::request::{Request, RequestId};
use crate::runner;
use crate::scheduler::{RequestOutput, Scheduler, SchedulerConfig};
use crate::EngineError;

/// Sizes of the engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub scheduler: SchedulerConfig,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Pool size in blocks; wins over `kv_cache_memory`.
    pub num_blocks: Option<usize>,
    /// Pool size in bytes (all layers, K and V).
    pub kv_cache_memory: Option<usize>,
    /// On a GPU, when neither size is given: the share of the card's memory the process may
    /// fill (weights, activations and the KV pool together).
    pub gpu_memory_utilization: f64,
    /// Requests allowed to wait for a slot beyond those running (excess gets `QueueFull`).
    pub max_waiting: usize,
    /// LoRA adapters: `None` serves the base model only (no device slots).
    pub lora: Option<AdapterLimits>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            scheduler: SchedulerConfig::default(),
            block_size: 16,
            num_blocks: None,
            kv_cache_memory: None,
            gpu_memory_utilization: 0.9,
            max_waiting: 256,
            lora: None,
        }
    }
}

/// Default KV pool when neither blocks nor bytes are given.
pub const DEFAULT_KV_CACHE_MEMORY: usize = 512 << 20;

/// Counters the outside may read (through the handle).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub num_running: usize,
    pub num_waiting: usize,
    pub num_free_blocks: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    pub num_preemptions: u64,
    /// Adapters copied into a LoRA device slot so far.
    pub num_lora_slot_loads: u64,
}

/// KV pool bytes when none were asked for: on a GPU what `gpu_memory_utilization` leaves after
/// what is in use (weights) and an activation reserve for the largest step; elsewhere
/// [`DEFAULT_KV_CACHE_MEMORY`].
fn kv_bytes_from_device(model: &dyn Model, config: &EngineConfig) -> usize {
    let Some((free, total)) = pagoda_kernels::device::memory_info(model.device()) else {
        return DEFAULT_KV_CACHE_MEMORY;
    };
    let budget = (total as f64 * config.gpu_memory_utilization.clamp(0.05, 1.0)) as usize;
    let in_use = total.saturating_sub(free);
    // f32 worst case, twice over: per token the residual stream, norms, q/k/v, attention out,
    // gate/up/activation; per sampled row a vocabulary of logits.
    let act = model.activation_bytes_per_token();
    let reserve = 2
        * (config.scheduler.max_num_batched_tokens * act
            + config.scheduler.max_num_seqs * model.vocab_size() * 4);
    budget.saturating_sub(in_use + reserve)
}

pub struct Engine {
    model: Box<dyn Model>,
    cache: PagedKvCache,
    scheduler: Scheduler,
    lora_slots: AdapterSlots,
}

impl Engine {
    pub fn new(
        mut model: Box<dyn Model>,
        config: &EngineConfig,
        eos_token_ids: Vec<u32>,
    ) -> Result<Self, EngineError> {
        let spec = model.kv_cache_spec();
        let sc = &config.scheduler;
        if config.block_size == 0 || sc.max_num_seqs == 0 || sc.max_num_batched_tokens == 0 {
            return Err(EngineError::Config(
                "block size, max_num_seqs and max_num_batched_tokens must be at least 1".into(),
            ));
        }
        let max_loras = config.lora.map_or(0, |l| l.max_loras);
        if let Some(l) = &config.lora {
            if l.max_loras == 0 || !(1..=64).contains(&l.max_lora_rank) {
                return Err(EngineError::Config(
                    "with LoRA on, max_loras must be at least 1 and max_lora_rank 1 to 64".into(),
                ));
            }
            // Before the KV pool is sized, so the slots' memory is counted as in use.
            model.init_lora_slots(l.max_loras, l.max_lora_rank)?;
            tracing::info!(
                slots = l.max_loras,
                max_rank = l.max_lora_rank,
                mib = model.lora_slot_bytes() >> 20,
                "LoRA device slots"
            );
        }
        let num_blocks = match (config.num_blocks, config.kv_cache_memory) {
            (Some(n), _) => n,
            (None, Some(bytes)) => bytes / spec.bytes_per_block(config.block_size),
            (None, None) => {
                kv_bytes_from_device(model.as_ref(), config)
                    / spec.bytes_per_block(config.block_size)
            }
        };
        if num_blocks == 0 {
            return Err(EngineError::Config(format!(
                "the KV pool must hold at least one block (block size {}, {} bytes per block)",
                config.block_size,
                spec.bytes_per_block(config.block_size)
            )));
        }
        let cache = PagedKvCache::new(&spec, num_blocks, config.block_size, model.device())?;
        let kv = KvCacheManager::new(num_blocks, config.block_size);
        let mut scheduler = Scheduler::new(config.scheduler, kv, eos_token_ids);
        scheduler.set_max_loras(max_loras);
        Ok(Self {
            model,
            cache,
            scheduler,
            lora_slots: AdapterSlots::new(max_loras),
        })
    }

    pub fn model(&self) -> &dyn Model {
        self.model.as_ref()
    }

    pub fn add(&mut self, request: Request) {
        self.scheduler.add(request);
    }

    pub fn abort(&mut self, id: RequestId) -> bool {
        self.scheduler.abort(id)
    }

    pub fn has_work(&self) -> bool {
        self.scheduler.has_work()
    }

    pub fn stats(&self) -> EngineStats {
        let kv = self.scheduler.kv();
        EngineStats {
            num_running: self.scheduler.num_running(),
            num_waiting: self.scheduler.num_waiting(),
            num_free_blocks: kv.num_free_blocks(),
            num_blocks: kv.num_blocks(),
            block_size: kv.block_size(),
            num_preemptions: self.scheduler.num_preemptions(),
            num_lora_slot_loads: self.lora_slots.num_loads(),
        }
    }

    /// One step. On a model error the step's requests are aborted and the error returned with
    /// their ids.
    pub fn step(&mut self) -> Result<Vec<RequestOutput>, (Vec<RequestId>, EngineError)> {
        let out = self.scheduler.schedule();
        if out.is_empty() {
            return Ok(Vec::new());
        }
        let run = runner::activate_adapters(
            &out,
            &self.scheduler,
            &mut self.lora_slots,
            self.model.as_mut(),
        )
        .and_then(|slots| {
            runner::execute(
                &out,
                &mut self.scheduler,
                self.model.as_ref(),
                &mut self.cache,
                slots.as_ref(),
            )
        });
        match run {
            Ok(sampled) => Ok(self.scheduler.update(&out, sampled)),
            Err(e) => {
                let ids: Vec<RequestId> = out.scheduled.iter().map(|s| s.id).collect();
                for &id in &ids {
                    self.scheduler.abort(id);
                }
                Err((ids, e))
            }
        }
    }
}
