//! Every GGUF weight format we serve gives nearly the f32 model's logits: a random
//! Llama-shaped model (wide enough for 256-element K-quant blocks) is written as GGUF in f32
//! and in each quantized format, with Q/K rows permuted as llama.cpp stores them, and both are
//! run through the paged forward.
use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use pagoda_models::{load_weights, LoadOptions};
use pagoda_tests::PagedRunner;

const HIDDEN: usize = 256;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
const FFN: usize = 512;
const LAYERS: usize = 2;
const VOCAB: usize = 320;

/// Deterministic pseudo-random normal-ish values.
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            let mut acc = 0.0;
            for _ in 0..4 {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                acc += ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
            }
            acc * scale
        })
        .collect()
}

/// llama.cpp's converter permutation of Q/K rows (HF half-split rope → interleaved pairs).
fn permute(w: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let d = rows / heads;
    let mut out = vec![0.0; w.len()];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..d / 2 {
                let src = h * d + j * d / 2 + i;
                let dst = h * d + 2 * i + j;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

fn weights() -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut out = Vec::new();
    let mut seed = 1;
    let mut add = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
        seed += 1;
        let n = shape.iter().product();
        let v: Vec<f32> = values(n, seed, scale)
            .into_iter()
            .map(|x| x + offset)
            .collect();
        out.push((name, shape, v));
    };
    add("token_embd.weight".into(), vec![VOCAB, HIDDEN], 1.0, 0.0);
    add("output_norm.weight".into(), vec![HIDDEN], 0.2, 1.0);
    add(
        "output.weight".into(),
        vec![VOCAB, HIDDEN],
        2.0 / (HIDDEN as f32).sqrt(),
        0.0,
    );
    for l in 0..LAYERS {
        let lin = 2.0 / (HIDDEN as f32).sqrt();
        add(format!("blk.{l}.attn_norm.weight"), vec![HIDDEN], 0.2, 1.0);
        add(
            format!("blk.{l}.attn_q.weight"),
            vec![HEADS * HEAD_DIM, HIDDEN],
            lin,
            0.0,
        );
        add(
            format!("blk.{l}.attn_k.weight"),
            vec![KV_HEADS * HEAD_DIM, HIDDEN],
            lin,
            0.0,
        );
        add(
            format!("blk.{l}.attn_v.weight"),
            vec![KV_HEADS * HEAD_DIM, HIDDEN],
            lin,
            0.0,
        );
        add(
            format!("blk.{l}.attn_output.weight"),
            vec![HIDDEN, HEADS * HEAD_DIM],
            lin,
            0.0,
        );
        add(format!("blk.{l}.ffn_norm.weight"), vec![HIDDEN], 0.2, 1.0);
        add(
            format!("blk.{l}.ffn_gate.weight"),
            vec![FFN, HIDDEN],
            lin,
            0.0,
        );
        add(
            format!("blk.{l}.ffn_up.weight"),
            vec![FFN, HIDDEN],
            lin,
            0.0,
        );
        add(
            format!("blk.{l}.ffn_down.weight"),
            vec![HIDDEN, FFN],
            2.0 / (FFN as f32).sqrt(),
            0.0,
        );
    }
    for (name, shape, v) in out.iter_mut() {
        if name.ends_with("attn_q.weight") {
            *v = permute(v, shape[0], shape[1], HEADS);
        } else if name.ends_with("attn_k.weight") {
            *v = permute(v, shape[0], shape[1], KV_HEADS);
        }
    }
    out
}

fn write_gguf(path: &Path, dtype: GgmlDType) {
    use gguf_file::Value;
    let md: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.context_length", Value::U32(256)),
        ("llama.embedding_length", Value::U32(HIDDEN as u32)),
        ("llama.block_count", Value::U32(LAYERS as u32)),
        ("llama.feed_forward_length", Value::U32(FFN as u32)),
        ("llama.attention.head_count", Value::U32(HEADS as u32)),
        ("llama.attention.head_count_kv", Value::U32(KV_HEADS as u32)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.rope.freq_base", Value::F32(10000.0)),
        ("llama.vocab_size", Value::U32(VOCAB as u32)),
    ];
    let tensors: Vec<(String, QTensor)> = weights()
        .into_iter()
        .map(|(name, shape, v)| {
            let t = Tensor::from_vec(v, shape.as_slice(), &Device::Cpu).unwrap();
            // Matrices in the format under test; embeddings and norms stay f32, as in real files.
            let dt = if shape.len() == 2 && name != "token_embd.weight" {
                dtype
            } else {
                GgmlDType::F32
            };
            (name, QTensor::quantize(&t, dt).unwrap())
        })
        .collect();
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
}

fn logits(path: &Path) -> Vec<Vec<f32>> {
    let model = load_weights(path, &LoadOptions::default()).unwrap();
    let mut runner = PagedRunner::new(&model, 8, 16);
    let prompt: Vec<u32> = (0..12).map(|i| (i * 37 + 5) % VOCAB as u32).collect();
    let mut rows = runner.feed(&model, &prompt[..7]);
    rows.extend(runner.feed(&model, &prompt[7..]));
    rows
}

/// Cosine similarity of all logits.
fn cosine(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
        ab += (*x as f64) * (*y as f64);
        aa += (*x as f64).powi(2);
        bb += (*y as f64).powi(2);
    }
    (ab / (aa.sqrt() * bb.sqrt())) as f32
}

#[test]
fn quantized_formats_track_the_f32_model() {
    let dir = std::env::temp_dir().join(format!("pagoda-quant-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f32_path = dir.join("f32.gguf");
    write_gguf(&f32_path, GgmlDType::F32);
    let reference = logits(&f32_path);
    // Lower bounds a little below what each format reaches here (f16 1.0, q8_0 0.9996,
    // q6_k 0.998, q5 0.993, q4 0.97, q3_k 0.92).
    let formats: HashMap<&str, (GgmlDType, f32)> = HashMap::from([
        ("f16", (GgmlDType::F16, 0.9999)),
        ("q8_0", (GgmlDType::Q8_0, 0.999)),
        ("q4_0", (GgmlDType::Q4_0, 0.95)),
        ("q4_1", (GgmlDType::Q4_1, 0.95)),
        ("q5_0", (GgmlDType::Q5_0, 0.985)),
        ("q6_k", (GgmlDType::Q6K, 0.995)),
        ("q5_k", (GgmlDType::Q5K, 0.985)),
        ("q4_k", (GgmlDType::Q4K, 0.95)),
        ("q3_k", (GgmlDType::Q3K, 0.88)),
    ]);
    let mut report = Vec::new();
    for (name, (dtype, min)) in &formats {
        let path = dir.join(format!("{name}.gguf"));
        write_gguf(&path, *dtype);
        let c = cosine(&reference, &logits(&path));
        report.push((name, c, *min));
    }
    eprintln!("{report:?}");
    for (name, c, min) in report {
        assert!(c >= min, "{name}: cosine {c} < {min}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
