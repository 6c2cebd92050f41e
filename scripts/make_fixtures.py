#!/usr/bin/env python3
"""Generate the small reference fixtures under tests/fixtures/ (run via scripts/make-fixtures).

Everything is deterministic (fixed seeds, single CPU thread): running it twice gives the
same bytes. The outputs are committed; CI never runs this script.

  tests/fixtures/tiny-llama/        HF folder (config.json, model.safetensors) + expected.json
  tests/fixtures/tiny-llama3/       same, llama3 rope scaling, tied embeddings
  tests/fixtures/tiny-qwen2/        Qwen2 (q/k/v bias), rope_theta 1e6
  tests/fixtures/tiny-llama.gguf    tiny-llama's weights as llama.cpp's converter lays them out (F32)
  tests/fixtures/tiny-llama-q8_0.gguf  same, 2-D weights (except token_embd) quantized to Q8_0
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

import gguf
from gguf import GGMLQuantizationType, GGUFValueType
import transformers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"

# Fixed prompt: 21 token ids in [3, 256) (0..2 are left for pad/bos/eos).
PROMPT_IDS = [17, 204, 5, 88, 131, 250, 42, 9, 177, 63, 118, 3, 221, 96, 140, 33, 255, 71, 160, 12, 199]
N_DECODE = 6

SIZES = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=256,
    max_position_embeddings=512,
)

# Weight scales: the default init (std 0.02) gives logits of ~0.1; these give logits with std ~4.
EMBED_STD = 0.5    # embed_tokens and lm_head
NORM_JITTER = 0.2  # RMSNorm weights = 1 + NORM_JITTER * N(0,1), so a missing norm weight shows
BIAS_STD = 0.5     # Qwen2 q/k/v biases (default init would leave them at zero)


def r7(x: float) -> float:
    """Round to 7 significant digits."""
    return float(f"{x:.7g}")


def init_weights(model: torch.nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        # named_parameters() yields a tied lm_head only once (as embed_tokens).
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(1.0 + NORM_JITTER * torch.randn(p.shape))
            elif name.endswith(".bias"):
                p.copy_(BIAS_STD * torch.randn(p.shape))
            elif "embed_tokens" in name or "lm_head" in name:
                p.copy_(EMBED_STD * torch.randn(p.shape))
            elif p.dim() == 2:
                p.copy_(torch.randn(p.shape) / math.sqrt(p.shape[1]))
            else:
                raise RuntimeError(f"unexpected parameter {name} {tuple(p.shape)}")


def llama_config(**over) -> LlamaConfig:
    kw = dict(SIZES, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    kw.update(over)
    return LlamaConfig(**kw)


def qwen2_config() -> Qwen2Config:
    return Qwen2Config(
        **SIZES,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        use_sliding_window=False,
    )


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # 64 rather than 32: with head_dim 16 and theta 5e5 the wavelengths are 6.3, 32.4, 168, ...;
    # 32 would leave the smoothing branch unused, 64 puts one frequency in each of the three
    # regimes (kept / smoothed / divided by factor). Checked in check_llama3_rope().
    "original_max_position_embeddings": 64,
}

FIXTURES = [
    # name, model class, config factory, seed
    ("tiny-llama", LlamaForCausalLM, lambda: llama_config(), 1234),
    (
        "tiny-llama3",
        LlamaForCausalLM,
        lambda: llama_config(rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE), tie_word_embeddings=True),
        2351,  # picked among 2345..2364 so greedy decode is not one token repeated (tied embeddings)
    ),
    ("tiny-qwen2", Qwen2ForCausalLM, qwen2_config, 3456),
]


def check_llama3_rope(cfg: LlamaConfig) -> None:
    inv_default, _ = ROPE_INIT_FUNCTIONS["default"](cfg, "cpu")
    inv_llama3, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    factor = cfg.rope_scaling["factor"]
    kinds = []
    for d, s in zip(inv_default.tolist(), inv_llama3.tolist()):
        if math.isclose(s, d, rel_tol=1e-6):
            kinds.append("kept")
        elif math.isclose(s, d / factor, rel_tol=1e-6):
            kinds.append("scaled")
        else:
            kinds.append("smoothed")
    print(f"  llama3 rope inv_freq regimes (head_dim {len(kinds) * 2}): {kinds}")
    assert {"kept", "scaled", "smoothed"} <= set(kinds), "llama3 rope scaling does not exercise all regimes"


def forward_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
    return out.logits[0].float()


def compute_expected(model) -> dict:
    prefill = forward_logits(model, PROMPT_IDS)
    assert prefill.shape == (len(PROMPT_IDS), 256)
    seq = list(PROMPT_IDS)
    last = prefill[-1]
    decode = []
    min_margin = float("inf")
    for _ in range(N_DECODE):
        top2 = torch.topk(last, 2).values
        min_margin = min(min_margin, float(top2[0] - top2[1]))
        tok = int(torch.argmax(last))
        seq.append(tok)
        last = forward_logits(model, seq)[-1]  # full forward over the whole sequence
        decode.append((tok, last))

    # Cross-check against the HF KV-cache path.
    with torch.no_grad():
        out = model(input_ids=torch.tensor([PROMPT_IDS]), use_cache=True)
        pkv = out.past_key_values
        cached_diff = float((out.logits[0] - prefill).abs().max())
        for tok, ref in decode:
            out = model(input_ids=torch.tensor([[tok]]), past_key_values=pkv, use_cache=True)
            pkv = out.past_key_values
            cached_diff = max(cached_diff, float((out.logits[0, -1] - ref).abs().max()))
    assert cached_diff < 1e-4, f"cache vs full forward mismatch {cached_diff}"

    all_logits = torch.cat([prefill, torch.stack([l for _, l in decode])])
    max_abs = float(all_logits.abs().max())
    print(
        f"  logits: max|.| {max_abs:.3f}, std {float(all_logits.std()):.3f}, "
        f"min top1-top2 margin at decode {min_margin:.4f}, cache-vs-full max diff {cached_diff:.2e}, "
        f"decoded {[t for t, _ in decode]}"
    )
    assert float(all_logits.std()) > 0.5, "logits too close to zero"
    assert min_margin > 1e-2, "greedy choice too close to a tie"
    return {
        "prompt_ids": list(PROMPT_IDS),
        "max_abs_logit": r7(max_abs),
        "prefill_logits": [[r7(v) for v in row.tolist()] for row in prefill],
        "decode": [{"token": tok, "logits": [r7(v) for v in l.tolist()]} for tok, l in decode],
    }


def dump_expected(exp: dict, path: Path) -> None:
    d = lambda v: json.dumps(v, separators=(",", ":"))
    lines = ["{"]
    lines.append(f' "prompt_ids": {d(exp["prompt_ids"])},')
    lines.append(f' "max_abs_logit": {d(exp["max_abs_logit"])},')
    lines.append(' "prefill_logits": [')
    lines.append(",\n".join("  " + d(row) for row in exp["prefill_logits"]))
    lines.append(" ],")
    lines.append(' "decode": [')
    lines.append(",\n".join("  " + d(e) for e in exp["decode"]))
    lines.append(" ]")
    lines.append("}")
    path.write_text("\n".join(lines) + "\n")
    assert json.loads(path.read_text()) == exp


def make_hf_fixture(name: str, cls, make_cfg, seed: int) -> None:
    print(f"[{name}]")
    out = FIX / name
    if out.exists():
        shutil.rmtree(out)
    cfg = make_cfg()
    cfg._attn_implementation = "eager"
    if name == "tiny-llama3":
        check_llama3_rope(cfg)
    torch.manual_seed(seed)
    model = cls(cfg)
    init_weights(model, seed)
    model = model.float().eval()
    model.save_pretrained(out, safe_serialization=True)

    # Expected outputs come from the model as reloaded from the saved folder.
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    assert type(reloaded) is cls
    sd_saved = load_file(out / "model.safetensors")
    for k, v in model.state_dict().items():
        if k == "lm_head.weight" and cfg.tie_word_embeddings:
            assert k not in sd_saved
            continue
        assert np.array_equal(sd_saved[k], v.numpy()), k
        assert sd_saved[k].dtype == np.float32, k
    if name == "tiny-qwen2":
        for k in [k for k in sd_saved if k.endswith(".bias")]:
            assert np.abs(sd_saved[k]).min() > 0, f"{k} has zeros"
    exp = compute_expected(reloaded)
    ref = forward_logits(model, PROMPT_IDS)
    assert torch.equal(ref, forward_logits(reloaded, PROMPT_IDS))
    dump_expected(exp, out / "expected.json")


# ---------------------------------------------------------------------------------------------
# GGUF


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable unicode mapping (same as transformers' gpt2 tokenizer)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (HF rotate-half -> interleaved rope)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class Writer(gguf.GGUFWriter):
    """GGUFWriter refuses empty arrays; llama.cpp requires tokenizer.ggml.merges for gpt2 vocabs,
    so allow an empty (typed) array."""

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        if vtype == GGUFValueType.ARRAY and isinstance(val, (list, tuple)) and len(val) == 0:
            out = bytearray()
            if add_vtype:
                out += self._pack("I", vtype)
            out += self._pack("I", sub_type if sub_type is not None else GGUFValueType.STRING)
            out += self._pack("Q", 0)
            return bytes(out)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def gguf_tensors(sd: dict[str, np.ndarray], cfg: dict) -> list[tuple[str, np.ndarray]]:
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    out = [
        ("token_embd.weight", sd["model.embed_tokens.weight"]),
        ("output_norm.weight", sd["model.norm.weight"]),
        ("output.weight", sd["lm_head.weight"]),
    ]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            (f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"]),
            (f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], nh, nh)),
            (f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], nh, nkv)),
            (f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"]),
            (f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"]),
            (f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"]),
            (f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"]),
            (f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"]),
            (f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"]),
        ]
    return [(n, np.ascontiguousarray(t, dtype=np.float32)) for n, t in out]


def is_quantized(name: str, t: np.ndarray) -> bool:
    return t.ndim == 2 and name != "token_embd.weight"


def write_gguf(path: Path, hf_dir: Path, q8: bool) -> None:
    cfg = json.loads((hf_dir / "config.json").read_text())
    sd = load_file(hf_dir / "model.safetensors")
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    if path.exists():
        path.unlink()
    w = Writer(str(path), "llama")  # writes general.architecture = llama
    w.add_name("tiny-llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if q8 else gguf.LlamaFileType.ALL_F32)
    b2u = bytes_to_unicode()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([b2u[b] for b in range(256)])
    w.add_token_types([gguf.TokenType.NORMAL] * 256)
    w.add_key_value(gguf.Keys.Tokenizer.MERGES, [], GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, t in gguf_tensors(sd, cfg):
        if q8 and is_quantized(name, t):
            w.add_tensor(name, gguf.quants.quantize(t, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def verify_gguf(path: Path, hf_dir: Path, q8: bool) -> None:
    cfg = json.loads((hf_dir / "config.json").read_text())
    sd = load_file(hf_dir / "model.safetensors")
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    r = gguf.GGUFReader(str(path))
    f = lambda k: r.fields[k].contents()
    expect_kv = {
        "general.architecture": "llama",
        "general.name": "tiny-llama",
        "general.file_type": 7 if q8 else 0,
        "llama.context_length": 512,
        "llama.embedding_length": 64,
        "llama.block_count": 2,
        "llama.feed_forward_length": 128,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.freq_base": 10000.0,
        "llama.rope.dimension_count": 16,
        "llama.vocab_size": 256,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.merges": [],
    }
    for k, v in expect_kv.items():
        assert f(k) == v, (k, f(k), v)
    assert math.isclose(f("llama.attention.layer_norm_rms_epsilon"), 1e-5, rel_tol=1e-6)
    b2u = bytes_to_unicode()
    assert f("tokenizer.ggml.tokens") == [b2u[b] for b in range(256)]
    assert f("tokenizer.ggml.token_type") == [1] * 256

    expected = dict(gguf_tensors(sd, cfg))
    assert [t.name for t in r.tensors] == list(expected), [t.name for t in r.tensors]
    worst_q8 = 0.0
    for t in r.tensors:
        ref = expected[t.name]
        assert list(t.shape) == list(reversed(ref.shape)), (t.name, t.shape, ref.shape)  # ggml ne order
        if q8 and is_quantized(t.name, ref):
            assert t.tensor_type == GGMLQuantizationType.Q8_0, t.name
            deq = gguf.quants.dequantize(np.asarray(t.data), GGMLQuantizationType.Q8_0).reshape(ref.shape)
            # Q8_0: per-block scale d = max|x|/127 stored as f16: error <= d/2 + 127*|d - f16(d)| < 0.6*d
            blocks = ref.reshape(-1, 32)
            bound = (np.abs(blocks).max(axis=1, keepdims=True) / 127.0) * 0.6 + 1e-7
            err = np.abs(deq.reshape(-1, 32) - blocks)
            assert (err <= bound).all(), t.name
            worst_q8 = max(worst_q8, float(err.max()))
            continue
        assert t.tensor_type == GGMLQuantizationType.F32, t.name
        data = np.asarray(t.data).reshape(ref.shape)
        assert np.array_equal(data, ref), t.name
        # Un-permute Q/K and compare with the original HF weights exactly.
        if t.name.endswith("attn_q.weight") or t.name.endswith("attn_k.weight"):
            i = int(t.name.split(".")[1])
            kind = "q" if "attn_q" in t.name else "k"
            hf = sd[f"model.layers.{i}.self_attn.{kind}_proj.weight"]
            heads = nh if kind == "q" else nkv
            assert np.array_equal(unpermute(data, heads), hf), t.name
            assert not np.array_equal(data, hf), t.name  # the permutation must actually move rows
    extra = f", Q8_0 max abs err {worst_q8:.2e}" if q8 else ""
    print(f"  {path.name}: {len(r.tensors)} tensors, metadata and data verified{extra}")


def main() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"gguf {importlib.metadata.version('gguf')}, numpy {np.__version__}"
    )
    FIX.mkdir(parents=True, exist_ok=True)
    for name, cls, make_cfg, seed in FIXTURES:
        make_hf_fixture(name, cls, make_cfg, seed)

    print("[gguf]")
    hf = FIX / "tiny-llama"
    for fname, q8 in [("tiny-llama.gguf", False), ("tiny-llama-q8_0.gguf", True)]:
        write_gguf(FIX / fname, hf, q8)
        verify_gguf(FIX / fname, hf, q8)

    print("[summary]")
    total = 0
    for p in sorted(FIX.rglob("*")):
        # demo-lora/ is a trained adapter for the default model (scripts/train-demo-lora), a few
        # MB, with its own size check; the cap below is for the tiny generated fixtures.
        if p.is_file() and p.relative_to(FIX).parts[0] != "demo-lora":
            size = p.stat().st_size
            total += size
            sha = hashlib.sha256(p.read_bytes()).hexdigest()[:12]
            print(f"  {size:>9}  {sha}  {p.relative_to(ROOT)}")
    print(f"  {total:>9}  total ({total / 2**20:.2f} MiB)")
    if total > 3 * 2**20:
        sys.exit("tests/fixtures is over 3 MiB")


if __name__ == "__main__":
    main()
