//! Turns a scheduler decision into a model forward and sampled tokens: builds the flattened
//! [`ForwardBatch`] (tokens, slots, block tables, LoRA slots), runs the model, samples per
//! request.
use std::collections::HashMap;
use std::sync::Arc;

use pagoda_adapters::{AdapterId, AdapterSlots, LoraAdapter};
use pagoda_kernels::{AttentionMetadata, LoraIndices, NO_SLOT};
use pagoda_models::{ForwardBatch, Model, PagedKvCache};

use crate::request::RequestId;
use crate::sampler::SampledToken;
use crate::scheduler::{Scheduler, SchedulerOutput};
use crate::EngineError;

/// Puts the step's adapters into device slots; `None` when no scheduled request has one.
pub fn activate_adapters(
    out: &SchedulerOutput,
    scheduler: &Scheduler,
    slots: &mut AdapterSlots,
    model: &mut dyn Model,
) -> Result<Option<HashMap<AdapterId, u32>>, EngineError> {
    let mut adapters = Vec::new();
    for s in &out.scheduled {
        let req = scheduler.request(s.id).expect("scheduled request exists");
        if let Some(a) = &req.adapter {
            if !adapters.iter().any(|b: &&Arc<LoraAdapter>| b.id == a.id) {
                adapters.push(a);
            }
        }
    }
    if adapters.is_empty() {
        return Ok(None);
    }
    Ok(Some(slots.activate(&adapters, model)?))
}

/// The step's batch, in scheduled order. `lora_slots` maps the step's adapters to their slots.
pub fn build_batch(
    out: &SchedulerOutput,
    scheduler: &Scheduler,
    lora_slots: Option<&HashMap<AdapterId, u32>>,
) -> ForwardBatch {
    let kv = scheduler.kv();
    let max_blocks_per_seq = out
        .scheduled
        .iter()
        .map(|s| kv.blocks_for(s.num_computed_tokens + s.num_new_tokens))
        .max()
        .unwrap_or(0);
    let mut batch = ForwardBatch {
        input_ids: Vec::with_capacity(out.num_batched_tokens),
        attention: AttentionMetadata::new(
            Vec::with_capacity(out.num_batched_tokens),
            vec![0],
            Vec::with_capacity(out.scheduled.len()),
            Vec::with_capacity(out.scheduled.len() * max_blocks_per_seq),
            max_blocks_per_seq,
        ),
        logits_indices: Vec::new(),
        lora: None,
    };
    let mut token_slots = Vec::new();
    for s in &out.scheduled {
        let req = scheduler.request(s.id).expect("scheduled request exists");
        if let Some(map) = lora_slots {
            let slot = req.adapter_id().map_or(NO_SLOT, |a| map[&a]);
            token_slots.extend(std::iter::repeat_n(slot, s.num_new_tokens));
        }
        let end = s.num_computed_tokens + s.num_new_tokens;
        for p in s.num_computed_tokens..end {
            batch.input_ids.push(req.token(p));
            batch.attention.slot_mapping.push(kv.slot(s.id, p));
        }
        batch
            .attention
            .query_start_loc
            .push(batch.input_ids.len() as u32);
        batch.attention.seq_lens.push(end as u32);
        let table = kv.block_table(s.id);
        batch
            .attention
            .block_tables
            .extend(table.iter().map(|b| b.0));
        batch
            .attention
            .block_tables
            .extend(std::iter::repeat_n(0, max_blocks_per_seq - table.len()));
        if s.samples {
            batch.logits_indices.push(batch.input_ids.len() as u32 - 1);
        }
    }
    if lora_slots.is_some() {
        batch.lora = Some(LoraIndices::new(token_slots));
    }
    batch
}

/// Runs the step on the model and samples a token for every request that reached its end.
/// Plain greedy rows take their argmax where the logits are (on the GPU only token ids cross
/// to the host); the other rows come to the host for the full sampler.
pub fn execute(
    out: &SchedulerOutput,
    scheduler: &mut Scheduler,
    model: &dyn Model,
    cache: &mut PagedKvCache,
    lora_slots: Option<&HashMap<AdapterId, u32>>,
) -> Result<Vec<(RequestId, SampledToken)>, EngineError> {
    let batch = build_batch(out, scheduler, lora_slots);
    let logits = model.forward(&batch, cache)?;
    if batch.logits_indices.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<RequestId> = out
        .scheduled
        .iter()
        .filter(|s| s.samples)
        .map(|s| s.id)
        .collect();
    let plain: Vec<bool> = rows
        .iter()
        .map(|id| {
            let req = scheduler.request(*id).expect("scheduled request exists");
            req.params.is_plain_greedy(req.output_tokens.len())
        })
        .collect();
    let argmax = if plain.iter().any(|&p| p) {
        logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?
    } else {
        Vec::new()
    };
    let full_idx: Vec<u32> = (0..rows.len() as u32)
        .filter(|&i| !plain[i as usize])
        .collect();
    let mut full = if full_idx.is_empty() {
        Vec::new()
    } else if full_idx.len() == rows.len() {
        logits.to_vec2::<f32>()?
    } else {
        let idx = candle_core::Tensor::new(full_idx.as_slice(), logits.device())?;
        logits.index_select(&idx, 0)?.to_vec2::<f32>()?
    };
    let eos = scheduler.eos_token_ids().to_vec();
    let mut full_rows = full.iter_mut();
    let mut sampled = Vec::with_capacity(rows.len());
    for (i, id) in rows.into_iter().enumerate() {
        let token = if plain[i] {
            SampledToken {
                token: argmax[i],
                logprob: f32::NAN,
                top_logprobs: Vec::new(),
            }
        } else {
            let row = full_rows
                .next()
                .expect("a host row per full-sampling request");
            let req = scheduler.request_mut(id).expect("scheduled request exists");
            req.sampler
                .sample(row, &req.params, &req.output_tokens, &eos)
        };
        sampled.push((id, token));
    }
    Ok(sampled)
}
