"""Hugging Face transformers baseline on the GPU machine, same shapes as gpu-bench: random
bf16 weights, greedy generation with a fixed number of new tokens, output tokens per second.

    python3 benches/gpu/hf_baseline.py --shape llama3-8b --batch 1 32 --prompt-len 128 --gen-len 128
"""
import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, max_position_embeddings=8192,
                         tie_word_embeddings=True),
}

p = argparse.ArgumentParser()
p.add_argument("--shape", default="llama3-8b")
p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
p.add_argument("--prompt-len", type=int, default=128)
p.add_argument("--gen-len", type=int, default=128)
p.add_argument("--attn", default="sdpa")
args = p.parse_args()

torch.manual_seed(0)
config = LlamaConfig(**SHAPES[args.shape], attn_implementation=args.attn)
with torch.device("cuda"):
    model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
model.eval()
for batch in args.batch:
    ids = torch.randint(0, config.vocab_size, (batch, args.prompt_len), device="cuda")
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)
    torch.cuda.synchronize()
    t = time.time()
    model.generate(ids, max_new_tokens=args.gen_len, min_new_tokens=args.gen_len, **kw)
    torch.cuda.synchronize()
    dt = time.time() - t
    print(f"| {args.shape} | HF transformers {args.attn}, batch {batch} ({args.prompt_len} in, {args.gen_len} out) "
          f"| {dt:.1f} s | {batch * args.gen_len / dt:.1f} output tok/s |", flush=True)
