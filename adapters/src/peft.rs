//! PEFT's LoRA format: `adapter_config.json` and `adapter_model.safetensors` with tensors
//! `base_model.model.model.layers.{L}.{self_attn|mlp}.{q_proj|...}.lora_{A|B}.weight`,
//! `A [r, in]`, `B [out, r]`. The update is `B A x · scaling`, scaling `alpha / r` (rsLoRA:
//! `alpha / √r`).
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use pagoda_models::{LoraPair, LoraShapes, LoraTarget, LoraWeights};
use serde::Deserialize;

use crate::AdapterError;

/// One loaded generation of an adapter; a new load of the same name gets a new id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AdapterId(pub u64);

/// An immutable adapter generation in host memory.
#[derive(Debug)]
pub struct LoraAdapter {
    pub id: AdapterId,
    pub name: String,
    pub path: PathBuf,
    pub rank: usize,
    pub targets: Vec<LoraTarget>,
    /// `a` and scaled `bt` per layer and target, f32 on the host.
    pub weights: LoraWeights,
    pub size_bytes: usize,
    /// Shared count of generations alive (registry or requests still hold them).
    live: Arc<AtomicUsize>,
}

impl Drop for LoraAdapter {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Deserialize)]
struct PeftConfig {
    #[serde(default)]
    peft_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    target_modules: Option<serde_json::Value>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    rank_pattern: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    alpha_pattern: serde_json::Map<String, serde_json::Value>,
}

fn invalid(msg: impl Into<String>) -> AdapterError {
    AdapterError::Invalid(msg.into())
}

impl PeftConfig {
    fn read(dir: &Path) -> Result<Self, AdapterError> {
        let path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| invalid(format!("{}: {e}", path.display())))?;
        let unsupported = |what: &str| invalid(format!("{what} is not supported"));
        // Newer PEFT features that change the computation: refuse them rather than ignore.
        for key in [
            "lora_bias",
            "layer_replication",
            "target_parameters",
            "alora_invocation_tokens",
            "trainable_token_indices",
            "use_qalora",
        ] {
            let set = match json.get(key) {
                None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => {
                    false
                }
                Some(serde_json::Value::Array(a)) => !a.is_empty(),
                Some(serde_json::Value::Object(o)) => !o.is_empty(),
                Some(_) => true,
            };
            if set {
                return Err(unsupported(key));
            }
        }
        let cfg: PeftConfig = serde_json::from_value(json)
            .map_err(|e| invalid(format!("{}: {e}", path.display())))?;
        if cfg.peft_type.as_deref().is_some_and(|t| t != "LORA") {
            return Err(invalid(format!(
                "peft_type {:?}: only LORA adapters are supported",
                cfg.peft_type.unwrap_or_default()
            )));
        }
        if cfg.r == 0 || !(cfg.lora_alpha.is_finite() && cfg.lora_alpha > 0.0) {
            return Err(invalid("r and lora_alpha must be positive"));
        }
        if cfg.fan_in_fan_out {
            return Err(unsupported("fan_in_fan_out"));
        }
        if cfg.use_dora {
            return Err(unsupported("DoRA (use_dora)"));
        }
        if cfg.bias.as_deref().is_some_and(|b| b != "none") {
            return Err(unsupported("LoRA bias (bias != \"none\")"));
        }
        if cfg.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(unsupported("modules_to_save"));
        }
        if !cfg.rank_pattern.is_empty() || !cfg.alpha_pattern.is_empty() {
            return Err(unsupported("rank_pattern / alpha_pattern"));
        }
        if let Some(serde_json::Value::Array(names)) = &cfg.target_modules {
            for n in names {
                let n = n.as_str().unwrap_or_default();
                if LoraTarget::from_hf_name(n).is_none() {
                    return Err(invalid(format!(
                        "target module `{n}` is not supported (supported: {})",
                        supported_targets()
                    )));
                }
            }
        }
        Ok(cfg)
    }

    fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }
}

fn supported_targets() -> String {
    LoraTarget::ALL
        .iter()
        .map(|t| t.hf_name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// `(layer, target, is_b)` of a PEFT tensor name.
fn parse_name(name: &str) -> Option<(usize, LoraTarget, bool)> {
    let rest = name.strip_prefix("base_model.model.")?;
    let rest = rest.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer = layer.parse().ok()?;
    let rest = rest
        .strip_prefix("self_attn.")
        .or_else(|| rest.strip_prefix("mlp."))?;
    let (module, rest) = rest.split_once('.')?;
    let target = LoraTarget::from_hf_name(module)?;
    let is_b = match rest {
        "lora_A.weight" | "lora_A.default.weight" => false,
        "lora_B.weight" | "lora_B.default.weight" => true,
        _ => return None,
    };
    Some((layer, target, is_b))
}

impl LoraAdapter {
    /// An adapter from weights already in [`LoraWeights`] form, checked against the base model.
    pub(crate) fn new(
        (id, name, path): (AdapterId, &str, &Path),
        weights: LoraWeights,
        shapes: &LoraShapes,
        max_rank: usize,
        live: Arc<AtomicUsize>,
    ) -> Result<Self, AdapterError> {
        if weights.layers.len() != shapes.num_layers {
            return Err(invalid(format!(
                "weights for {} layers; the base model has {}",
                weights.layers.len(),
                shapes.num_layers
            )));
        }
        let mut targets = Vec::new();
        let (mut rank, mut size_bytes) = (0, 0);
        for (l, layer) in weights.layers.iter().enumerate() {
            for (target, pair) in LoraTarget::ALL.into_iter().zip(layer) {
                let Some(LoraPair { a, bt }) = pair else {
                    continue;
                };
                let (in_f, out_f) = shapes.features(target);
                let r = a.dims()[0];
                if a.dims() != [r, in_f] || bt.dims() != [r, out_f] || r == 0 {
                    return Err(invalid(format!(
                        "layer {l} {}: A {:?} and B {:?} do not fit the base model's \
                         ({in_f} in, {out_f} out)",
                        target.hf_name(),
                        a.dims(),
                        bt.t()?.dims(),
                    )));
                }
                if r > max_rank {
                    return Err(AdapterError::Limit(format!(
                        "adapter rank {r} is above the server's --max-lora-rank {max_rank}"
                    )));
                }
                rank = rank.max(r);
                size_bytes += (a.elem_count() + bt.elem_count()) * a.dtype().size_in_bytes();
                if !targets.contains(&target) {
                    targets.push(target);
                }
            }
        }
        if targets.is_empty() {
            return Err(invalid("the adapter holds no LoRA weights"));
        }
        targets.sort();
        live.fetch_add(1, Ordering::Relaxed);
        Ok(Self {
            id,
            name: name.to_string(),
            path: path.to_path_buf(),
            rank,
            targets,
            weights,
            size_bytes,
            live,
        })
    }
}

/// Reads a PEFT folder into [`LoraWeights`] for a model of `shapes` (`a` and scaled `bt`, f32).
/// Blocking file IO: call it off the engine thread and off the async runtime.
pub(crate) fn read_peft(
    dir: &Path,
    shapes: &LoraShapes,
    max_rank: usize,
) -> Result<LoraWeights, AdapterError> {
    if !dir.is_dir() {
        return Err(invalid(format!("{} is not a directory", dir.display())));
    }
    let cfg = PeftConfig::read(dir)?;
    if cfg.r > max_rank {
        return Err(AdapterError::Limit(format!(
            "adapter rank {} is above the server's --max-lora-rank {max_rank}",
            cfg.r
        )));
    }
    let file = dir.join("adapter_model.safetensors");
    if !file.is_file() {
        return Err(invalid(format!(
            "{} is missing (only the safetensors format is supported)",
            file.display()
        )));
    }
    let tensors = candle_core::safetensors::load(&file, &Device::Cpu)
        .map_err(|e| invalid(format!("{}: {e}", file.display())))?;
    let mut a_b: Vec<[[Option<Tensor>; 2]; 7]> = vec![Default::default(); shapes.num_layers];
    for (tname, t) in tensors {
        let (layer, target, is_b) = parse_name(&tname).ok_or_else(|| {
            invalid(format!(
                "unsupported tensor `{tname}`: only lora_A/lora_B of {} in model.layers are supported",
                supported_targets()
            ))
        })?;
        let slot = a_b
            .get_mut(layer)
            .ok_or_else(|| {
                invalid(format!(
                    "tensor `{tname}` is for layer {layer}; the base model has {} layers",
                    shapes.num_layers
                ))
            })
            .map(|l| &mut l[target.index()][is_b as usize])?;
        *slot = Some(t.to_dtype(DType::F32)?);
    }
    let scaling = cfg.scaling();
    let mut weights = LoraWeights {
        layers: vec![Default::default(); shapes.num_layers],
    };
    for (l, layer) in a_b.into_iter().enumerate() {
        for (target, [a, b]) in LoraTarget::ALL.into_iter().zip(layer) {
            let (a, b) = match (a, b) {
                (None, None) => continue,
                (Some(a), Some(b)) => (a, b),
                _ => {
                    return Err(invalid(format!(
                        "layer {l} {}: lora_A and lora_B must come together",
                        target.hf_name()
                    )))
                }
            };
            if a.dims()[0] != cfg.r || b.dims().get(1) != Some(&cfg.r) {
                return Err(invalid(format!(
                    "layer {l} {}: lora_A {:?} and lora_B {:?} do not fit rank {}",
                    target.hf_name(),
                    a.dims(),
                    b.dims(),
                    cfg.r
                )));
            }
            let bt = (b.t()? * scaling)?.contiguous()?;
            weights.layers[l][target.index()] = Some(LoraPair { a, bt });
        }
    }
    Ok(weights)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_names() {
        assert_eq!(
            parse_name("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"),
            Some((3, LoraTarget::Q, false))
        );
        assert_eq!(
            parse_name("base_model.model.model.layers.0.mlp.down_proj.lora_B.default.weight"),
            Some((0, LoraTarget::Down, true))
        );
        for bad in [
            "base_model.model.lm_head.lora_A.weight",
            "base_model.model.model.embed_tokens.lora_embedding_A",
            "base_model.model.model.layers.x.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.1.self_attn.q_proj.lora_B.bias",
            "model.layers.1.self_attn.q_proj.lora_A.weight",
        ] {
            assert_eq!(parse_name(bad), None, "{bad}");
        }
    }
}
