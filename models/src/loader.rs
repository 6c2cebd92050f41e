//! Opening a model by path: a `.gguf` file or a Hugging Face folder. Returns the model with its
//! tokenizer and chat template.
use std::path::Path;

use candle_core::{DType, Device};

use crate::arch::llama::Llama;
use crate::config::LlamaConfig;
use crate::model::Model;
use crate::tokenizer::ModelTokenizer;
use crate::weights::WeightSource;
use crate::{Error, Result};

/// A loaded model, ready for the engine.
pub struct LoadedModel {
    pub model: Box<dyn Model>,
    pub tokenizer: ModelTokenizer,
    pub config: LlamaConfig,
    /// A short name: the file or folder name.
    pub name: String,
}

/// How to load: where the model runs and in which float type its activations and KV cache are.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub device: Device,
    pub dtype: DType,
    /// Dequantize quantized GGUF weights to `dtype` at load (more memory, float matmuls).
    pub dequantize: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            dequantize: false,
        }
    }
}

/// Opens a GGUF file or a Hugging Face folder (`config.json`, `*.safetensors`, `tokenizer.json`).
pub fn load(path: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    let (model, config, tokenizer) = open(path, opts, true)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(LoadedModel {
        model: Box::new(model),
        tokenizer: tokenizer.expect("tokenizer requested"),
        config,
        name,
    })
}

/// Loads just the weights of a model (no tokenizer needed), from a GGUF file or a Hugging Face
/// folder. For tests and benchmarks that speak token ids.
pub fn load_weights(path: &Path, opts: &LoadOptions) -> Result<Llama> {
    Ok(open(path, opts, false)?.0)
}

fn open(
    path: &Path,
    opts: &LoadOptions,
    with_tokenizer: bool,
) -> Result<(Llama, LlamaConfig, Option<ModelTokenizer>)> {
    let (config, mut weights, tokenizer) = if path.is_dir() {
        let cfg_path = path.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Config(format!("{}: {e}", cfg_path.display())))?;
        let config = LlamaConfig::from_hf_json(&json)?;
        let tokenizer = if with_tokenizer {
            Some(ModelTokenizer::from_hf_dir(path)?)
        } else {
            None
        };
        (
            config,
            WeightSource::open_safetensors(path, &opts.device)?,
            tokenizer,
        )
    } else if path.is_file() {
        let weights = WeightSource::open_gguf(path, opts.dequantize)?;
        let content = weights.gguf().expect("GGUF source");
        let config = LlamaConfig::from_gguf(content)?;
        let tokenizer = if with_tokenizer {
            Some(ModelTokenizer::from_gguf(content)?)
        } else {
            None
        };
        (config, weights, tokenizer)
    } else {
        let missing = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder");
        return Err(Error::io(path, missing));
    };
    let model = Llama::load(config.clone(), &mut weights, opts.dtype, &opts.device)?;
    Ok((model, config, tokenizer))
}

/// File name of the default model (SmolLM2-135M-Instruct, Q4_1), fetched by `scripts/fetch-model`.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The model cache: `$PAGODA_HOME/models`, by default `~/.cache/pagoda/models`.
pub fn model_cache_dir() -> std::path::PathBuf {
    let home = std::env::var_os("PAGODA_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache/pagoda"))
        })
        .unwrap_or_else(|| std::path::PathBuf::from(".cache/pagoda"));
    home.join("models")
}

/// Resolves a `--model` argument: `default` (or nothing) means the default model in the cache.
pub fn resolve_model_path(arg: Option<&str>) -> Result<std::path::PathBuf> {
    match arg {
        None | Some("default") => {
            let path = model_cache_dir().join(DEFAULT_MODEL_FILE);
            if path.is_file() {
                Ok(path)
            } else {
                Err(Error::Config(format!(
                    "the default model is not at {}; run scripts/fetch-model (or pass --model PATH)",
                    path.display()
                )))
            }
        }
        Some(p) => Ok(std::path::PathBuf::from(p)),
    }
}
