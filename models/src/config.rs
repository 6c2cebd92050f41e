//! Architecture hyper-parameters of the Llama family, read from a Hugging Face `config.json` or
//! from GGUF metadata.
use candle_core::quantized::gguf_file;
use serde_json::Value;

use crate::{Error, Result};

/// Llama-3 style frequency-dependent rope scaling (`rope_type: "llama3"`).
#[derive(Clone, Debug, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
}

/// Hyper-parameters shared by Llama 2/3, SmolLM2, Mistral and Qwen2.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// `llama`, `mistral`, `qwen2`: informational.
    pub architecture: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on the q/k/v projections (Qwen2).
    pub attention_bias: bool,
}

fn get_usize(v: &Value, key: &str) -> Option<usize> {
    v.get(key).and_then(Value::as_u64).map(|x| x as usize)
}

fn get_f64(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

fn require(v: &Value, key: &str) -> Result<usize> {
    get_usize(v, key).ok_or_else(|| Error::Config(format!("config.json lacks `{key}`")))
}

impl LlamaConfig {
    /// From a Hugging Face `config.json` (transformers 4 `rope_theta`/`rope_scaling` or
    /// transformers 5 `rope_parameters`).
    pub fn from_hf_json(v: &Value) -> Result<Self> {
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("llama");
        let architecture = match model_type {
            "llama" | "mistral" | "qwen2" => model_type.to_string(),
            other => {
                return Err(Error::Unsupported(format!(
                    "model_type `{other}` (supported: llama, mistral, qwen2)"
                )))
            }
        };
        let hidden_size = require(v, "hidden_size")?;
        let num_heads = require(v, "num_attention_heads")?;
        let rope = v.get("rope_parameters").filter(|r| r.is_object());
        let rope_theta = rope
            .and_then(|r| get_f64(r, "rope_theta"))
            .or_else(|| get_f64(v, "rope_theta"))
            .unwrap_or(10000.0) as f32;
        let scaling = v.get("rope_scaling").filter(|r| r.is_object()).or(rope);
        let rope_scaling = match scaling {
            Some(s) => {
                let kind = s
                    .get("rope_type")
                    .or_else(|| s.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                match kind {
                    "default" => None,
                    "llama3" => Some(Llama3RopeScaling {
                        factor: get_f64(s, "factor").unwrap_or(8.0) as f32,
                        low_freq_factor: get_f64(s, "low_freq_factor").unwrap_or(1.0) as f32,
                        high_freq_factor: get_f64(s, "high_freq_factor").unwrap_or(4.0) as f32,
                        original_max_position_embeddings: get_usize(
                            s,
                            "original_max_position_embeddings",
                        )
                        .unwrap_or(8192),
                    }),
                    other => return Err(Error::Unsupported(format!("rope scaling `{other}`"))),
                }
            }
            None => None,
        };
        if model_type != "qwen2" && v.get("sliding_window").is_some_and(|w| !w.is_null()) {
            tracing::warn!("sliding-window attention is not implemented; full attention is used");
        }
        Ok(Self {
            architecture,
            hidden_size,
            intermediate_size: require(v, "intermediate_size")?,
            num_layers: require(v, "num_hidden_layers")?,
            num_heads,
            num_kv_heads: get_usize(v, "num_key_value_heads").unwrap_or(num_heads),
            head_dim: get_usize(v, "head_dim").unwrap_or(hidden_size / num_heads.max(1)),
            vocab_size: require(v, "vocab_size")?,
            rms_norm_eps: get_f64(v, "rms_norm_eps").unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: get_usize(v, "max_position_embeddings").unwrap_or(4096),
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            attention_bias: model_type == "qwen2"
                || v.get("attention_bias")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
        })
        .and_then(Self::checked)
    }

    /// From GGUF metadata (`general.architecture` and `{arch}.*` keys).
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let md = &content.metadata;
        let arch = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .ok_or_else(|| Error::Config("GGUF lacks general.architecture".into()))?;
        if !matches!(arch.as_str(), "llama" | "qwen2") {
            return Err(Error::Unsupported(format!(
                "GGUF architecture `{arch}` (supported: llama, qwen2)"
            )));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let u = |k: &str| -> Result<usize> {
            md.get(&key(k))
                .ok_or_else(|| Error::Config(format!("GGUF lacks {}", key(k))))?
                .to_u32()
                .map(|x| x as usize)
                .map_err(Error::from)
        };
        let f = |k: &str| md.get(&key(k)).and_then(|v| v.to_f32().ok());
        let hidden_size = u("embedding_length")?;
        let num_heads = u("attention.head_count")?;
        let vocab_size = match u("vocab_size") {
            Ok(n) => n,
            Err(_) => md
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.to_vec().ok())
                .map(Vec::len)
                .ok_or_else(|| Error::Config("GGUF has neither a vocab size nor tokens".into()))?,
        };
        Ok(Self {
            architecture: arch.clone(),
            hidden_size,
            intermediate_size: u("feed_forward_length")?,
            num_layers: u("block_count")?,
            num_heads,
            num_kv_heads: u("attention.head_count_kv").unwrap_or(num_heads),
            head_dim: u("attention.key_length").unwrap_or(hidden_size / num_heads.max(1)),
            vocab_size,
            rms_norm_eps: f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5) as f64,
            rope_theta: f("rope.freq_base").unwrap_or(10000.0),
            // Llama-3 GGUFs carry their scaled frequencies as the `rope_freqs.weight` tensor.
            rope_scaling: None,
            max_position_embeddings: u("context_length").unwrap_or(4096),
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
            attention_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        })
        .and_then(Self::checked)
    }

    fn checked(self) -> Result<Self> {
        let ok = self.num_heads > 0
            && self.num_kv_heads > 0
            && self.num_heads.is_multiple_of(self.num_kv_heads)
            && self.head_dim.is_multiple_of(2)
            && self.num_layers > 0
            && self.vocab_size > 0;
        if ok {
            Ok(self)
        } else {
            Err(Error::Config(format!("inconsistent config: {self:?}")))
        }
    }

    /// Rotary inverse frequencies, `[head_dim / 2]`, with Llama-3 scaling applied when set.
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f32 / d as f32))
            .collect();
        let Some(s) = &self.rope_scaling else {
            return base;
        };
        let old = s.original_max_position_embeddings as f32;
        let low_wavelen = old / s.low_freq_factor;
        let high_wavelen = old / s.high_freq_factor;
        base.into_iter()
            .map(|f| {
                let wavelen = 2.0 * std::f32::consts::PI / f;
                if wavelen < high_wavelen {
                    f
                } else if wavelen > low_wavelen {
                    f / s.factor
                } else {
                    let smooth = (old / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * f / s.factor + smooth * f
                }
            })
            .collect()
    }
}

impl LlamaConfig {
    /// Llama-3-8B's shape (hidden 4096, 32 layers, 32 heads, 8 KV heads, MLP 14336, vocab 128256).
    pub fn llama3_8b() -> Self {
        Self {
            architecture: "llama".into(),
            hidden_size: 4096,
            intermediate_size: 14336,
            num_layers: 32,
            num_heads: 32,
            num_kv_heads: 8,
            head_dim: 128,
            vocab_size: 128256,
            rms_norm_eps: 1e-5,
            rope_theta: 500000.0,
            rope_scaling: None,
            max_position_embeddings: 8192,
            tie_word_embeddings: false,
            attention_bias: false,
        }
    }

    /// SmolLM2-135M's shape.
    pub fn smollm2_135m() -> Self {
        Self {
            architecture: "llama".into(),
            hidden_size: 576,
            intermediate_size: 1536,
            num_layers: 30,
            num_heads: 9,
            num_kv_heads: 3,
            head_dim: 64,
            vocab_size: 49152,
            rms_norm_eps: 1e-5,
            rope_theta: 100000.0,
            rope_scaling: None,
            max_position_embeddings: 8192,
            tie_word_embeddings: true,
            attention_bias: false,
        }
    }
}
