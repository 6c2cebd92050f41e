//! Where a model's tensors come from: a GGUF file (quantized or float) or a Hugging Face folder of
//! safetensors. Names are Hugging Face names; the GGUF source translates them, and undoes the
//! row permutation llama.cpp's converter applies to Llama's Q/K projections, so one model
//! implementation serves both.
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::{ggml_file::qtensor_from_ggml, gguf_file, QMatMul, QTensor};
use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};

use crate::{Error, Result};

pub enum WeightSource {
    Gguf {
        content: gguf_file::Content,
        file: File,
        path: PathBuf,
        /// Undo llama.cpp's Q/K row permutation (`(num_heads, num_kv_heads)`), for arch `llama`.
        unpermute: Option<(usize, usize)>,
        /// Dequantize matrices at load.
        dequantize: bool,
    },
    Safetensors(HashMap<String, Tensor>),
}

/// Translates a Hugging Face tensor name to its GGUF name.
fn gguf_name(hf: &str) -> String {
    const FIXED: [(&str, &str); 3] = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = FIXED.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    const LAYER: [(&str, &str); 9] = [
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "ffn_norm"),
    ];
    if let Some(rest) = hf.strip_prefix("model.layers.") {
        if let Some((idx, tail)) = rest.split_once('.') {
            for (h, g) in LAYER {
                if let Some(suffix) = tail.strip_prefix(h) {
                    return format!("blk.{idx}.{g}{suffix}");
                }
            }
        }
    }
    hf.to_string()
}

/// Rows `h * d + 2 * i + j` of a llama.cpp-permuted Q/K matrix hold HF row `h * d + j * d / 2 + i`.
fn unpermute_rows(qt: &QTensor, num_heads: usize, device: &Device) -> Result<QTensor> {
    let (rows, cols) = qt.shape().dims2()?;
    let head_dim = rows / num_heads;
    let dtype = qt.dtype();
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    let data = qt.data()?;
    let mut out = vec![0u8; data.len()];
    for h in 0..num_heads {
        for i in 0..head_dim / 2 {
            for j in 0..2 {
                let src = h * head_dim + 2 * i + j;
                let dst = h * head_dim + j * head_dim / 2 + i;
                out[dst * row_bytes..(dst + 1) * row_bytes]
                    .copy_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    Ok(qtensor_from_ggml(dtype, &out, vec![rows, cols], device)?)
}

impl WeightSource {
    pub fn open_gguf(path: &Path, dequantize: bool) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| {
            Error::Config(format!(
                "{} is not a readable GGUF file: {e}",
                path.display()
            ))
        })?;
        Ok(WeightSource::Gguf {
            content,
            file,
            path: path.to_path_buf(),
            unpermute: None,
            dequantize,
        })
    }

    /// The GGUF header (metadata and tensor index), for GGUF sources.
    pub fn gguf(&self) -> Option<&gguf_file::Content> {
        match self {
            WeightSource::Gguf { content, .. } => Some(content),
            WeightSource::Safetensors(_) => None,
        }
    }

    /// Loads the safetensors of a Hugging Face folder: the shards that
    /// `model.safetensors.index.json` names when it exists (folders may hold other copies, such
    /// as Mistral's `consolidated.safetensors`), else every `*.safetensors`.
    pub fn open_safetensors(dir: &Path, device: &Device) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let mut files: Vec<PathBuf> = if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::Config(format!("{}: {e}", index.display())))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::Config(format!("{} has no weight_map", index.display())))?;
            let mut names: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            std::fs::read_dir(dir)
                .map_err(|e| Error::io(dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect()
        };
        files.sort();
        if files.is_empty() {
            return Err(Error::Config(format!(
                "no *.safetensors in {}",
                dir.display()
            )));
        }
        let bar = progress_bar(files.len() as u64, "loading safetensors");
        let mut tensors = HashMap::new();
        for f in &files {
            tensors.extend(candle_core::safetensors::load(f, device)?);
            bar.inc(1);
        }
        bar.finish_and_clear();
        Ok(WeightSource::Safetensors(tensors))
    }

    pub fn set_unpermute(&mut self, heads: Option<(usize, usize)>) {
        if let WeightSource::Gguf { unpermute, .. } = self {
            *unpermute = heads;
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        match self {
            WeightSource::Gguf { content, .. } => {
                content.tensor_infos.contains_key(&gguf_name(name))
            }
            WeightSource::Safetensors(t) => t.contains_key(name),
        }
    }

    fn qtensor(&mut self, name: &str, device: &Device) -> Result<QTensor> {
        let WeightSource::Gguf {
            content,
            file,
            path,
            unpermute,
            ..
        } = self
        else {
            unreachable!("qtensor is only called on GGUF sources")
        };
        let g = gguf_name(name);
        if !content.tensor_infos.contains_key(&g) {
            return Err(Error::MissingWeight(g));
        }
        let qt = content
            .tensor(file, &g, device)
            .map_err(|e| Error::Config(format!("{}: tensor {g}: {e}", path.display())))?;
        match *unpermute {
            Some((heads, _)) if g.ends_with("attn_q.weight") => unpermute_rows(&qt, heads, device),
            Some((_, kv_heads)) if g.ends_with("attn_k.weight") => {
                unpermute_rows(&qt, kv_heads, device)
            }
            _ => Ok(qt),
        }
    }

    /// A plain tensor (dequantized when stored quantized) in `dtype`.
    pub fn tensor(&mut self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let t = match self {
            WeightSource::Gguf { .. } => self.qtensor(name, device)?.dequantize(device)?,
            WeightSource::Safetensors(t) => t
                .get(name)
                .ok_or_else(|| Error::MissingWeight(name.to_string()))?
                .to_device(device)?,
        };
        Ok(t.to_dtype(dtype)?)
    }

    /// A matrix to multiply with: quantized weights stay quantized, float ones become `dtype`.
    pub fn linear(&mut self, name: &str, dtype: DType, device: &Device) -> Result<QMatMul> {
        match self {
            WeightSource::Gguf {
                dequantize: true, ..
            } => Ok(QMatMul::Tensor(self.tensor(name, dtype, device)?)),
            WeightSource::Gguf { .. } => {
                let qt = self.qtensor(name, device)?;
                match QMatMul::from_qtensor(qt)? {
                    QMatMul::Tensor(t) | QMatMul::TensorF16(t) => {
                        Ok(QMatMul::Tensor(t.to_dtype(dtype)?))
                    }
                    q => Ok(q),
                }
            }
            WeightSource::Safetensors(_) => Ok(QMatMul::Tensor(self.tensor(name, dtype, device)?)),
        }
    }
}

/// A progress bar on a terminal, nothing otherwise.
pub fn progress_bar(len: u64, message: &'static str) -> ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len).with_message(message);
    if let Ok(style) = ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len}") {
        bar.set_style(style);
    }
    bar
}

/// Random weights for a Llama-family config, made directly on `device` (for benchmarks of real
/// shapes without a model file). Linear layers ~ N(0, 1/in_features), norms 1, embeddings N(0, 1).
pub fn random_llama_weights(
    cfg: &crate::config::LlamaConfig,
    dtype: DType,
    device: &Device,
) -> Result<WeightSource> {
    let (h, d) = (cfg.hidden_size, cfg.head_dim);
    let mut t = HashMap::new();
    let mut linear = |name: String, rows: usize, cols: usize| -> Result<()> {
        let w = Tensor::randn(0f32, 1.0 / (cols as f32).sqrt(), (rows, cols), device)?
            .to_dtype(dtype)?;
        t.insert(name, w);
        Ok(())
    };
    linear("model.embed_tokens.weight".into(), cfg.vocab_size, h)?;
    linear("lm_head.weight".into(), cfg.vocab_size, h)?;
    for i in 0..cfg.num_layers {
        let p = format!("model.layers.{i}");
        linear(format!("{p}.self_attn.q_proj.weight"), cfg.num_heads * d, h)?;
        linear(
            format!("{p}.self_attn.k_proj.weight"),
            cfg.num_kv_heads * d,
            h,
        )?;
        linear(
            format!("{p}.self_attn.v_proj.weight"),
            cfg.num_kv_heads * d,
            h,
        )?;
        linear(format!("{p}.self_attn.o_proj.weight"), h, cfg.num_heads * d)?;
        linear(
            format!("{p}.mlp.gate_proj.weight"),
            cfg.intermediate_size,
            h,
        )?;
        linear(format!("{p}.mlp.up_proj.weight"), cfg.intermediate_size, h)?;
        linear(
            format!("{p}.mlp.down_proj.weight"),
            h,
            cfg.intermediate_size,
        )?;
    }
    let ones = Tensor::ones(h, dtype, device)?;
    for i in 0..cfg.num_layers {
        t.insert(
            format!("model.layers.{i}.input_layernorm.weight"),
            ones.clone(),
        );
        t.insert(
            format!("model.layers.{i}.post_attention_layernorm.weight"),
            ones.clone(),
        );
    }
    t.insert("model.norm.weight".into(), ones);
    Ok(WeightSource::Safetensors(t))
}
