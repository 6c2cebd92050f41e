//! What a model offers LoRA adapters: the projections that can be adapted ([`LoraTarget`]),
//! their shapes ([`LoraShapes`], which adapters are checked against) and the weights one adapter
//! writes into a device slot ([`LoraWeights`]). The batched update itself is
//! `pagoda_kernels::lora_apply`, driven by the per-token slots in [`crate::ForwardBatch`].
use candle_core::Tensor;

/// A projection of a decoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraTarget {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LoraTarget {
    pub const ALL: [LoraTarget; 7] = [
        LoraTarget::Q,
        LoraTarget::K,
        LoraTarget::V,
        LoraTarget::O,
        LoraTarget::Gate,
        LoraTarget::Up,
        LoraTarget::Down,
    ];

    /// The module's name in Hugging Face / PEFT checkpoints (`q_proj`, ...).
    pub fn hf_name(self) -> &'static str {
        match self {
            LoraTarget::Q => "q_proj",
            LoraTarget::K => "k_proj",
            LoraTarget::V => "v_proj",
            LoraTarget::O => "o_proj",
            LoraTarget::Gate => "gate_proj",
            LoraTarget::Up => "up_proj",
            LoraTarget::Down => "down_proj",
        }
    }

    pub fn from_hf_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.hf_name() == name)
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// The adaptable projections of a model: `(in_features, out_features)` of each target, the
/// same in every layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoraShapes {
    pub num_layers: usize,
    pub features: [(usize, usize); 7],
}

impl LoraShapes {
    pub fn features(&self, target: LoraTarget) -> (usize, usize) {
        self.features[target.index()]
    }
}

/// One adapter's update of one projection: `a [r, in]` and `bt [r, out]` = `(B · scaling)ᵀ`.
#[derive(Clone, Debug)]
pub struct LoraPair {
    pub a: Tensor,
    pub bt: Tensor,
}

/// One adapter's weights, ready to copy into a slot: `layers[l][target.index()]`.
#[derive(Clone, Debug, Default)]
pub struct LoraWeights {
    pub layers: Vec<[Option<LoraPair>; 7]>,
}
