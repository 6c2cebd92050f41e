#!/usr/bin/env python3
"""Generate the LoRA parity fixtures under tests/fixtures/tiny-llama-lora/ (run via
scripts/make-lora-fixtures).

Each adapter is a PEFT LoRA on the committed tests/fixtures/tiny-llama, saved in PEFT's own format
(adapter_config.json + adapter_model.safetensors, float32) with an expected.json in the same shape
as tiny-llama's, computed from the merged weights (W + scaling * B @ A) and checked against PEFT's
unmerged forward. Deterministic (fixed seeds, one thread): a rerun with the same pins gives the same
bytes. The outputs are committed; CI never runs this script.

  tests/fixtures/tiny-llama-lora/qv-r4/           q_proj, v_proj; r 4, alpha 8
  tests/fixtures/tiny-llama-lora/all-r8/          all seven linear layers; r 8, alpha 16
  tests/fixtures/tiny-llama-lora/mlp-r16-rslora/  gate/up/down; r 16, alpha 32, rsLoRA
  tests/fixtures/tiny-llama-lora/ko-r2/           k_proj, o_proj of layer 1 only; r 2, alpha 2
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

import peft
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaForCausalLM

# Same folder: reuse the prompt, the reference computation and the expected.json layout.
from make_fixtures import PROMPT_IDS, compute_expected, dump_expected, forward_logits

ROOT = Path(__file__).resolve().parent.parent
BASE_REL = "tests/fixtures/tiny-llama"  # relative, so adapter_config.json names no local path
OUT = ROOT / "tests" / "fixtures" / "tiny-llama-lora"

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]

# B @ A is drawn with entries of the same size as the base weight it adds to (N(0,1)/sqrt(fan_in)),
# times REL_DELTA / scaling, so every adapter moves the logits by O(1) whatever its alpha and r.
REL_DELTA = 0.35

# Seeds picked among ten each so that the greedy top1-top2 margin stays >= 0.25 over the 6 decode
# steps (a reimplementation's rounding cannot flip a token) and the decoded tokens leave the base's.
ADAPTERS = [
    # name, LoraConfig arguments, seed
    ("qv-r4", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), 4103),
    ("all-r8", dict(r=8, lora_alpha=16, target_modules=ATTN + MLP), 4110),
    ("mlp-r16-rslora", dict(r=16, lora_alpha=32, target_modules=MLP, use_rslora=True), 4108),
    ("ko-r2", dict(r=2, lora_alpha=2, target_modules=["k_proj", "o_proj"], layers_to_transform=[1]), 4109),
]


def load_base() -> LlamaForCausalLM:
    model = LlamaForCausalLM.from_pretrained(BASE_REL, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def lora_modules(model) -> list[tuple[str, torch.nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return sorted((n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer))


def randomize(model, seed: int) -> float:
    """Overwrite PEFT's init (B = 0) with random A and B; returns the scaling PEFT applies."""
    torch.manual_seed(seed)
    scalings = set()
    with torch.no_grad():
        for _, m in lora_modules(model):
            a, b = m.lora_A["default"].weight, m.lora_B["default"].weight  # [r, in], [out, r]
            r, fan_in = a.shape
            scaling = m.scaling["default"]
            scalings.add(scaling)
            # Var((B @ A)_ij) = r * (1/r) * (1/fan_in) * s^2 = s^2 / fan_in.
            s = REL_DELTA / scaling
            a.copy_(torch.randn(a.shape) / math.sqrt(fan_in))
            b.copy_(s * torch.randn(b.shape) / math.sqrt(r))
    assert len(scalings) == 1, scalings
    return scalings.pop()


def tidy_config(path: Path) -> dict:
    """PEFT keeps target_modules in a set, so its saved order follows string hashing; sort it so
    the file does not depend on PYTHONHASHSEED. Same layout as PEFT writes (indent 2, sorted keys)."""
    cfg = json.loads(path.read_text())
    cfg["target_modules"] = sorted(cfg["target_modules"])
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return cfg


def make_adapter(name: str, lora_kw: dict, seed: int, base_logits: torch.Tensor) -> None:
    print(f"[{name}]")
    out = OUT / name
    if out.exists():
        shutil.rmtree(out)

    cfg = LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, bias="none", **lora_kw)
    model = get_peft_model(load_base(), cfg).eval()
    scaling = randomize(model, seed)
    model.save_pretrained(out, safe_serialization=True)
    (out / "README.md").unlink()  # PEFT's empty model card
    saved_cfg = tidy_config(out / "adapter_config.json")

    # The saved tensors are exactly the module weights, under PEFT's names, in float32.
    saved = load_file(out / "adapter_model.safetensors")
    want = {}
    for mod_name, m in lora_modules(model):
        key = mod_name.replace(".base_layer", "")
        want[f"{key}.lora_A.weight"] = m.lora_A["default"].weight.detach().numpy()
        want[f"{key}.lora_B.weight"] = m.lora_B["default"].weight.detach().numpy()
    assert sorted(saved) == sorted(want), (sorted(saved), sorted(want))
    for k, v in want.items():
        assert saved[k].dtype == np.float32 and np.array_equal(saved[k], v), k
    layers = sorted({int(k.split(".layers.")[1].split(".")[0]) for k in saved})
    if "layers_to_transform" in lora_kw:
        assert layers == lora_kw["layers_to_transform"], layers
    r = lora_kw["r"]
    expect_scaling = lora_kw["lora_alpha"] / (math.sqrt(r) if lora_kw.get("use_rslora") else r)
    assert math.isclose(scaling, expect_scaling), (scaling, expect_scaling)
    print(
        f"  {len(saved)} tensors (layers {layers}), scaling {scaling:g}, "
        f"target_modules {saved_cfg['target_modules']}"
    )

    # Reference: merge the saved adapter into a fresh copy of the base.
    unmerged = PeftModel.from_pretrained(load_base(), out).eval()
    merged = PeftModel.from_pretrained(load_base(), out).merge_and_unload().eval()
    assert type(merged) is LlamaForCausalLM
    exp = compute_expected(merged)  # prints a line for the merged model, then one for PEFT's forward
    unmerged_exp = compute_expected(unmerged)
    flat = lambda e: torch.tensor(e["prefill_logits"] + [d["logits"] for d in e["decode"]])
    diff = float((flat(exp) - flat(unmerged_exp)).abs().max())
    assert [d["token"] for d in exp["decode"]] == [d["token"] for d in unmerged_exp["decode"]]
    assert diff < 1e-4, f"merged vs unmerged mismatch {diff}"
    # The in-memory adapter (before saving) agrees too.
    assert torch.allclose(forward_logits(model, PROMPT_IDS), forward_logits(unmerged, PROMPT_IDS), atol=1e-5)

    delta = forward_logits(merged, PROMPT_IDS) - base_logits
    base_next = int(torch.argmax(base_logits[-1]))
    print(
        f"  merged vs unmerged max diff {diff:.2e}; vs base: max|dlogit| {float(delta.abs().max()):.3f}, "
        f"mean|dlogit| {float(delta.abs().mean()):.3f}, argmax changed at "
        f"{int((delta + base_logits).argmax(-1).ne(base_logits.argmax(-1)).sum())}/{len(PROMPT_IDS)} "
        f"prompt positions, first token {base_next} -> {exp['decode'][0]['token']}"
    )
    assert float(delta.abs().max()) > 1.0, "adapter barely changes the logits"
    dump_expected(exp, out / "expected.json")


def main() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    os.chdir(ROOT)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"safetensors {importlib.metadata.version('safetensors')}, numpy {np.__version__}"
    )
    base_logits = forward_logits(load_base(), PROMPT_IDS)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, lora_kw, seed in ADAPTERS:
        make_adapter(name, lora_kw, seed, base_logits)

    print("[summary]")
    total = 0
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            size = p.stat().st_size
            total += size
            sha = hashlib.sha256(p.read_bytes()).hexdigest()[:12]
            print(f"  {size:>9}  {sha}  {p.relative_to(ROOT)}")
    print(f"  {total:>9}  total ({total / 2**20:.2f} MiB)")
    assert total < 2**20, "tests/fixtures/tiny-llama-lora is over 1 MiB"


if __name__ == "__main__":
    main()
