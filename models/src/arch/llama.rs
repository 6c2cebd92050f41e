//! The Llama family: Llama 2/3 (with Llama-3 rope scaling), SmolLM2, Mistral and Qwen2 (bias on
//! q/k/v). Pre-norm decoder blocks of RMSNorm → GQA attention with rotary embeddings → RMSNorm →
//! SwiGLU MLP, over a flattened varlen batch and the paged KV cache.
use candle_core::quantized::{ggml_file::qtensor_from_ggml, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use pagoda_kernels::cpu_quant::CpuQMatrix;
use pagoda_kernels::{lora_apply, paged_attention, reshape_and_cache, LoraStack};

use crate::config::LlamaConfig;
use crate::lora::{LoraShapes, LoraTarget, LoraWeights};
use crate::model::{ForwardBatch, KvCacheSpec, Model, PagedKvCache};
use crate::weights::{progress_bar, WeightSource};
use crate::Result;

/// A weight matrix: candle's (dense, or quantized on the GPU) or, for quantized formats on the
/// CPU, our SIMD kernels' repacked layout.
enum Weight {
    Candle(QMatMul),
    CpuQuant(CpuQMatrix),
}

impl Weight {
    /// Moves quantized CPU matrices to the SIMD kernels where they support the format.
    fn specialized(self) -> Result<Self> {
        if let Weight::Candle(QMatMul::QTensor(q)) = &self {
            if let Some(m) = CpuQMatrix::from_qtensor(q)? {
                return Ok(Weight::CpuQuant(m));
            }
        }
        Ok(self)
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Weight::Candle(q) => q.forward(x)?,
            Weight::CpuQuant(m) => m.forward(x)?,
        })
    }
}

struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

impl Linear {
    fn load(
        w: &mut WeightSource,
        name: &str,
        bias: bool,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let weight = Weight::Candle(w.linear(&format!("{name}.weight"), dtype, device)?);
        let bias = if bias {
            Some(w.tensor(&format!("{name}.bias"), dtype, device)?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    fn specialized(self) -> Result<Self> {
        Ok(Self {
            weight: self.weight.specialized()?,
            bias: self.bias,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.weight.forward(x)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Projections of the same input (q/k/v, gate/up), fused into one matrix when their formats
/// allow: one larger matmul instead of several small ones.
enum MultiLinear {
    Fused(Linear),
    Separate(Vec<Linear>),
}

impl MultiLinear {
    fn new(parts: Vec<Linear>) -> Result<Self> {
        let weights: Vec<&QMatMul> = parts
            .iter()
            .filter_map(|p| match &p.weight {
                Weight::Candle(q) => Some(q),
                Weight::CpuQuant(_) => None,
            })
            .collect();
        let dense: Vec<Tensor> = weights
            .iter()
            .filter_map(|w| match w {
                QMatMul::Tensor(t) => Some(t.clone()),
                _ => None,
            })
            .collect();
        let quant: Vec<&QTensor> = weights
            .iter()
            .filter_map(|w| match w {
                QMatMul::QTensor(q) => Some(q.as_ref()),
                _ => None,
            })
            .collect();
        let weight = if dense.len() == parts.len() {
            Some(QMatMul::Tensor(Tensor::cat(&dense, 0)?))
        } else if quant.len() == parts.len() {
            concat_rows(&quant)?
                .map(QMatMul::from_qtensor)
                .transpose()?
        } else {
            None
        };
        let bias = match parts
            .iter()
            .map(|p| p.bias.clone())
            .collect::<Option<Vec<_>>>()
        {
            Some(bs) => Some(Some(Tensor::cat(&bs, 0)?)),
            None if parts.iter().all(|p| p.bias.is_none()) => Some(None),
            None => None,
        };
        Ok(match (weight, bias) {
            (Some(weight), Some(bias)) => {
                let linear = Linear {
                    weight: Weight::Candle(weight),
                    bias,
                }
                .specialized()?;
                MultiLinear::Fused(linear)
            }
            _ => MultiLinear::Separate(
                parts
                    .into_iter()
                    .map(Linear::specialized)
                    .collect::<Result<_>>()?,
            ),
        })
    }

    /// All parts' outputs side by side, `[T, Σ out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            MultiLinear::Fused(linear) => linear.forward(x)?,
            MultiLinear::Separate(parts) => {
                let ys = parts
                    .iter()
                    .map(|p| p.forward(x))
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&ys, 1)?
            }
        })
    }
}

/// Stacks quantized matrices of one format and width (rows are independent byte ranges).
fn concat_rows(qs: &[&QTensor]) -> Result<Option<QTensor>> {
    let first = qs[0];
    let (_, cols) = first.shape().dims2()?;
    if qs
        .iter()
        .any(|q| q.dtype() != first.dtype() || q.shape().dims().get(1) != Some(&cols))
    {
        return Ok(None);
    }
    let mut bytes = Vec::new();
    let mut rows = 0;
    for q in qs {
        bytes.extend_from_slice(&q.data()?);
        rows += q.shape().dims()[0];
    }
    let device = first.device();
    Ok(Some(qtensor_from_ggml(
        first.dtype(),
        &bytes,
        vec![rows, cols],
        &device,
    )?))
}

/// Projections computed as one matmul (and so adapted by one packed LoRA stack), in the order
/// of their fused output.
#[derive(Clone, Copy)]
enum LoraGroup {
    Qkv,
    O,
    GateUp,
    Down,
}

impl LoraGroup {
    const ALL: [LoraGroup; 4] = [
        LoraGroup::Qkv,
        LoraGroup::O,
        LoraGroup::GateUp,
        LoraGroup::Down,
    ];

    fn targets(self) -> &'static [LoraTarget] {
        match self {
            LoraGroup::Qkv => &[LoraTarget::Q, LoraTarget::K, LoraTarget::V],
            LoraGroup::O => &[LoraTarget::O],
            LoraGroup::GateUp => &[LoraTarget::Gate, LoraTarget::Up],
            LoraGroup::Down => &[LoraTarget::Down],
        }
    }
}

struct Layer {
    input_norm: Tensor,
    /// q, k, v.
    qkv: MultiLinear,
    o: Linear,
    post_norm: Tensor,
    /// gate, up.
    gate_up: MultiLinear,
    down: Linear,
}

pub struct Llama {
    cfg: LlamaConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Weight,
    /// `[max_positions, head_dim / 2]`.
    cos: Tensor,
    sin: Tensor,
    /// LoRA slots: per layer, one stack per [`LoraTarget`] (empty until `init_lora_slots`).
    lora: Vec<Vec<LoraStack>>,
    dtype: DType,
    device: Device,
}

impl Llama {
    /// Loads the weights named in Hugging Face style from `w` (GGUF sources translate).
    pub fn load(
        cfg: LlamaConfig,
        w: &mut WeightSource,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if cfg.architecture == "llama" {
            w.set_unpermute(Some((cfg.num_heads, cfg.num_kv_heads)));
        }
        let embed = w.tensor("model.embed_tokens.weight", dtype, device)?;
        let bar = progress_bar(cfg.num_layers as u64, "loading layers");
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let lin = |w: &mut WeightSource, n: &str, bias: bool| {
                Linear::load(w, &format!("{p}.{n}"), bias, dtype, device)
            };
            let ab = cfg.attention_bias;
            layers.push(Layer {
                input_norm: w.tensor(&format!("{p}.input_layernorm.weight"), dtype, device)?,
                qkv: MultiLinear::new(vec![
                    lin(w, "self_attn.q_proj", ab)?,
                    lin(w, "self_attn.k_proj", ab)?,
                    lin(w, "self_attn.v_proj", ab)?,
                ])?,
                o: lin(w, "self_attn.o_proj", false)?.specialized()?,
                post_norm: w.tensor(
                    &format!("{p}.post_attention_layernorm.weight"),
                    dtype,
                    device,
                )?,
                gate_up: MultiLinear::new(vec![
                    lin(w, "mlp.gate_proj", false)?,
                    lin(w, "mlp.up_proj", false)?,
                ])?,
                down: lin(w, "mlp.down_proj", false)?.specialized()?,
            });
            bar.inc(1);
        }
        bar.finish_and_clear();
        let norm = w.tensor("model.norm.weight", dtype, device)?;
        let lm_head = if !cfg.tie_word_embeddings && w.contains("lm_head.weight") {
            w.linear("lm_head.weight", dtype, device)?
        } else {
            w.linear("model.embed_tokens.weight", dtype, device)?
        };
        let lm_head = Weight::Candle(lm_head).specialized()?;
        let mut inv_freq = cfg.inv_freq();
        // Llama-3 GGUFs store the scaling as per-frequency divisors.
        if w.contains("rope_freqs.weight") {
            let factors = w
                .tensor("rope_freqs.weight", DType::F32, &Device::Cpu)?
                .to_vec1::<f32>()?;
            for (f, d) in inv_freq.iter_mut().zip(factors) {
                *f /= d;
            }
        }
        let max_pos = cfg.max_position_embeddings;
        let inv = Tensor::from_vec(inv_freq, (1, cfg.head_dim / 2), device)?;
        let t = Tensor::arange(0u32, max_pos as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((max_pos, 1))?;
        let freqs = t.broadcast_mul(&inv)?;
        Ok(Self {
            cos: freqs.cos()?.to_dtype(dtype)?,
            sin: freqs.sin()?.to_dtype(dtype)?,
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            lora: Vec::new(),
            dtype,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// `y` (the fused output of a packed group of layer `layer`, input `x`) with the step's
    /// LoRA updates added in place.
    fn lora(
        &self,
        batch: &ForwardBatch,
        (layer, group): (usize, LoraGroup),
        x: &Tensor,
        y: Tensor,
    ) -> Result<Tensor> {
        let Some(idx) = &batch.lora else {
            return Ok(y);
        };
        let Some(stacks) = self.lora.get(layer) else {
            return Err(crate::Error::Config(
                "a step uses LoRA adapters but the model has no LoRA slots".into(),
            ));
        };
        lora_apply(&y, x, &stacks[group as usize], idx)?;
        Ok(y)
    }
}

impl Model for Llama {
    fn kv_cache_spec(&self) -> KvCacheSpec {
        KvCacheSpec {
            num_layers: self.cfg.num_layers,
            num_kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
            dtype: self.dtype,
        }
    }

    fn max_context_len(&self) -> usize {
        self.cfg.max_position_embeddings
    }

    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn activation_bytes_per_token(&self) -> usize {
        let c = &self.cfg;
        let qkv = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim;
        4 * (4 * c.hidden_size + qkv + 3 * c.intermediate_size)
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn forward(&self, batch: &ForwardBatch, cache: &mut PagedKvCache) -> Result<Tensor> {
        let cfg = &self.cfg;
        let num_tokens = batch.input_ids.len();
        let (h, kvh, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let inter = cfg.intermediate_size;
        let meta = &batch.attention;
        let ids = Tensor::new(batch.input_ids.as_slice(), &self.device)?;
        let positions = Tensor::new(meta.positions().as_slice(), &self.device)?;
        let cos = self.cos.index_select(&positions, 0)?;
        let sin = self.sin.index_select(&positions, 0)?;
        let scale = 1.0 / (d as f32).sqrt();
        let eps = cfg.rms_norm_eps as f32;
        let mut x = self.embed.index_select(&ids, 0)?;
        for (i, (layer, kv)) in self.layers.iter().zip(cache.layers.iter()).enumerate() {
            let hs = candle_nn::ops::rms_norm(&x, &layer.input_norm, eps)?;
            let qkv = self.lora(batch, (i, LoraGroup::Qkv), &hs, layer.qkv.forward(&hs)?)?;
            let q = qkv.narrow(1, 0, h * d)?.reshape((1, num_tokens, h, d))?;
            let k = qkv
                .narrow(1, h * d, kvh * d)?
                .reshape((1, num_tokens, kvh, d))?;
            let v = qkv
                .narrow(1, (h + kvh) * d, kvh * d)?
                .reshape((num_tokens, kvh, d))?;
            let q = candle_nn::rotary_emb::rope_thd(&q.contiguous()?, &cos, &sin)?.squeeze(0)?;
            let k = candle_nn::rotary_emb::rope_thd(&k.contiguous()?, &cos, &sin)?.squeeze(0)?;
            reshape_and_cache(&k, &v, kv, &meta.slot_mapping)?;
            let attn = paged_attention(&q, kv, meta, scale)?.reshape((num_tokens, h * d))?;
            let o = self.lora(batch, (i, LoraGroup::O), &attn, layer.o.forward(&attn)?)?;
            x = (x + o)?;
            let hs = candle_nn::ops::rms_norm(&x, &layer.post_norm, eps)?;
            let mlp = {
                let gu = self.lora(
                    batch,
                    (i, LoraGroup::GateUp),
                    &hs,
                    layer.gate_up.forward(&hs)?,
                )?;
                (candle_nn::ops::silu(&gu.narrow(1, 0, inter)?)? * gu.narrow(1, inter, inter)?)?
            };
            let down = self.lora(batch, (i, LoraGroup::Down), &mlp, layer.down.forward(&mlp)?)?;
            x = (x + down)?;
        }
        let idx = Tensor::new(batch.logits_indices.as_slice(), &self.device)?;
        let x = x.index_select(&idx, 0)?;
        let x = candle_nn::ops::rms_norm(&x, &self.norm, eps)?;
        let logits = self.lm_head.forward(&x)?;
        Ok(logits.to_dtype(DType::F32)?.contiguous()?)
    }

    fn lora_shapes(&self) -> LoraShapes {
        let c = &self.cfg;
        let (hidden, q, kv, inter) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
            c.intermediate_size,
        );
        LoraShapes {
            num_layers: c.num_layers,
            features: [
                (hidden, q),
                (hidden, kv),
                (hidden, kv),
                (q, hidden),
                (hidden, inter),
                (hidden, inter),
                (inter, hidden),
            ],
        }
    }

    fn init_lora_slots(&mut self, num_slots: usize, max_rank: usize) -> Result<()> {
        let shapes = self.lora_shapes();
        self.lora = (0..shapes.num_layers)
            .map(|_| {
                LoraGroup::ALL
                    .iter()
                    .map(|g| {
                        let targets = g.targets();
                        let outs: Vec<usize> =
                            targets.iter().map(|&t| shapes.features(t).1).collect();
                        let in_f = shapes.features(targets[0]).0;
                        LoraStack::zeros(num_slots, max_rank, in_f, &outs, self.dtype, &self.device)
                    })
                    .collect::<candle_core::Result<Vec<_>>>()
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(())
    }

    fn lora_slot_bytes(&self) -> usize {
        self.lora
            .iter()
            .flatten()
            .map(LoraStack::size_in_bytes)
            .sum()
    }

    fn set_lora_slot(&mut self, slot: usize, weights: Option<&LoraWeights>) -> Result<()> {
        if let Some(w) = weights {
            if w.layers.len() != self.lora.len() {
                return Err(crate::Error::Config(format!(
                    "LoRA weights for {} layers, the model has {} layers with LoRA slots",
                    w.layers.len(),
                    self.lora.len()
                )));
            }
        }
        for (l, stacks) in self.lora.iter_mut().enumerate() {
            for (g, stack) in LoraGroup::ALL.iter().zip(stacks.iter_mut()) {
                for (part, t) in g.targets().iter().enumerate() {
                    let pair = weights.and_then(|w| w.layers[l][t.index()].as_ref());
                    stack.set_slot(slot, part, pair.map(|p| (&p.a, &p.bt)))?;
                }
            }
        }
        Ok(())
    }
}
