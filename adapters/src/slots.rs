//! The model's LoRA device slots as an LRU cache of adapter generations. Owned by the engine
//! thread. Adapters always stay in host memory; a slot is only a device copy, so evicting one
//! just lets another adapter overwrite it.
use std::collections::HashMap;
use std::sync::Arc;

use pagoda_models::Model;

use crate::peft::{AdapterId, LoraAdapter};
use crate::AdapterError;

pub struct AdapterSlots {
    /// Per slot: the generation in it and the step it was last used in.
    slots: Vec<Option<(AdapterId, u64)>>,
    step: u64,
    num_loads: u64,
}

impl AdapterSlots {
    pub fn new(num_slots: usize) -> Self {
        Self {
            slots: vec![None; num_slots],
            step: 0,
            num_loads: 0,
        }
    }

    /// Adapters copied into a slot so far (cache misses).
    pub fn num_loads(&self) -> u64 {
        self.num_loads
    }

    /// Gives every adapter of a step a slot, copying missing ones into the model over the
    /// least recently used slots not needed by this step. At most `num_slots` distinct
    /// adapters per step (the scheduler's limit).
    pub fn activate(
        &mut self,
        adapters: &[&Arc<LoraAdapter>],
        model: &mut dyn Model,
    ) -> Result<HashMap<AdapterId, u32>, AdapterError> {
        self.step += 1;
        let mut out = HashMap::with_capacity(adapters.len());
        for a in adapters {
            if let Some(i) = self.find(a.id) {
                self.slots[i] = Some((a.id, self.step));
                out.insert(a.id, i as u32);
            }
        }
        for a in adapters {
            if out.contains_key(&a.id) {
                continue;
            }
            let i = self
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.is_none_or(|(_, used)| used < self.step))
                .min_by_key(|(_, s)| s.map_or(0, |(_, used)| used))
                .map(|(i, _)| i)
                .ok_or_else(|| {
                    AdapterError::Limit(format!(
                        "a step needs more than {} LoRA slots",
                        self.slots.len()
                    ))
                })?;
            // Mark the slot empty first: if the copy fails half-way it holds nothing valid.
            self.slots[i] = None;
            model.set_lora_slot(i, Some(&a.weights))?;
            self.slots[i] = Some((a.id, self.step));
            self.num_loads += 1;
            out.insert(a.id, i as u32);
        }
        Ok(out)
    }

    fn find(&self, id: AdapterId) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.is_some_and(|(sid, _)| sid == id))
    }
}
