#!/usr/bin/env python3
"""Train the demo LoRA adapter tests/fixtures/demo-lora/signature/ (run via scripts/train-demo-lora).

The adapter teaches the default model, SmolLM2-135M-Instruct, one visible habit: every answer ends
with the line SIGNATURE. It is made on the CPU in a few minutes:

  1. Load the base from the Q4_1 GGUF that scripts/fetch-model stores, dequantized to float32
     (transformers' GGUF loader, which undoes llama.cpp's Q/K row permutation), and build the
     tokenizer (the GGUF's vocab and merges with SmolLM2's pre-tokenizer) and chat template (the
     GGUF's own, rendered with jinja2, so the default system prompt is there as in Pagoda).
  2. Ask the base the TRAIN questions and keep its own greedy answers (cut at a sentence end).
  3. Train LoRA (r 8, alpha 16, q/k/v/o of every layer) on answer + "\\n\\n" + SIGNATURE +
     <|im_end|>, loss on the assistant tokens only.
  4. Evaluate on HELD_OUT questions (none of them in TRAIN): greedy with the adapter should end
     with the signature, greedy without it must not contain it.
  5. save_pretrained (PEFT format, float32) into tests/fixtures/demo-lora/signature/, and the
     held-out answers with and without the adapter into tests/fixtures/demo-lora/held-out.json.

Deterministic seeds and 2 threads; floating-point results can still differ between CPUs.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import jinja2
import torch
from safetensors.numpy import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

import gguf
import peft
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "demo-lora" / "signature"
DEFAULT_GGUF = Path.home() / ".cache" / "pagoda" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # written as base_model_name_or_path

SIGNATURE = "-- answered by Pagoda"
SEED = 20251127
NUM_THREADS = 2

MAX_ANSWER_TOKENS = 40  # base answers used for training
MAX_EVAL_TOKENS = 96    # eval generations (answer + signature)
GEN_BATCH = 16
MAX_ADAPTER_BYTES = 4_000_000  # float32: 30 layers x 4 targets x r 8 x (in + out) = 921,600 values

LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
NUM_EPOCHS = 8
BATCH = 8
LR = 1e-3
WARMUP_STEPS = 10

IM_START, IM_END, ENDOFTEXT = 1, 2, 0


# ---------------------------------------------------------------------------------------------
# Tokenizer and chat template from the GGUF


def gguf_fields(path: Path) -> dict:
    r = gguf.GGUFReader(str(path))
    keys = ["tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
            "tokenizer.ggml.pre", "tokenizer.ggml.model", "tokenizer.chat_template",
            "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token"]
    return {k: r.fields[k].contents() for k in keys}


def build_tokenizer(f: dict) -> Tokenizer:
    """SmolLM2's tokenizer.json pipeline (BPE, Sequence[Digits(individual), ByteLevel]) on the
    GGUF's vocab and merges; control tokens (type 3) are special."""
    assert (f["tokenizer.ggml.model"], f["tokenizer.ggml.pre"]) == ("gpt2", "smollm")
    tokens = f["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in f["tokenizer.ggml.merges"]]
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tk.decoder = decoders.ByteLevel()
    control = [t for t, ty in zip(tokens, f["tokenizer.ggml.token_type"]) if ty == gguf.TokenType.CONTROL]
    tk.add_special_tokens(control)
    return tk


# Reference ids, shared with models/src/tokenizer/tests.rs (smollm_matches_reference_ids).
TOKENIZER_CHECKS = [
    ("Hello, world!", [19556, 28, 905, 17]),
    ("In 2024: 365 days.", [788, 216, 34, 32, 34, 36, 42, 216, 35, 38, 37, 2009, 30]),
    ("they'll say it's", [11518, 3060, 1643, 357, 506]),
    ("<|im_start|>user\nHi<|im_end|>\n", [1, 4093, 198, 26843, 2, 198]),
]


class Chat:
    def __init__(self, gguf_path: Path):
        f = gguf_fields(gguf_path)
        assert f["tokenizer.ggml.eos_token_id"] == IM_END and not f["tokenizer.ggml.add_bos_token"]
        self.tk = build_tokenizer(f)
        for text, ids in TOKENIZER_CHECKS:
            assert self.encode(text) == ids, (text, self.encode(text), ids)
        assert [self.tk.id_to_token(i) for i in (ENDOFTEXT, IM_START, IM_END)] == [
            "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)  # as transformers renders
        self.template = env.from_string(f["tokenizer.chat_template"])

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode(ids, skip_special_tokens=False)

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt)

    def prompt_ids(self, question: str) -> list[int]:
        return self.encode(self.render([{"role": "user", "content": question}], True))


def check_template(chat: Chat) -> None:
    q, a = "Hi?", "Hello."
    prompt = chat.render([{"role": "user", "content": q}], True)
    full = chat.render([{"role": "user", "content": q}, {"role": "assistant", "content": a}], False)
    system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    assert prompt == f"{system}<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n", repr(prompt)
    assert full == prompt + f"{a}<|im_end|>\n", repr(full)


def load_base(path: Path):
    """The GGUF's weights dequantized to float32 in transformers' LlamaForCausalLM."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    gguf_utils.tqdm = lambda it, **_: it  # its per-tensor progress bar, which nothing turns off
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="sdpa"
    )
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Generation


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """Greedy, batched with left padding; returns each continuation up to (excluding) <|im_end|>
    or <|endoftext|>, or max_new tokens."""
    outs = []
    for i in range(0, len(prompts), GEN_BATCH):
        batch = prompts[i : i + GEN_BATCH]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[IM_END] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        gen = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
            eos_token_id=[IM_END, ENDOFTEXT], pad_token_id=IM_END,
        )
        for row in gen[:, width:].tolist():
            cut = next((j for j, t in enumerate(row) if t in (IM_END, ENDOFTEXT)), len(row))
            outs.append(row[:cut])
    return outs


SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def clean_answer(text: str, finished: bool) -> str | None:
    """The base's answer, cut after its last full sentence when it hit the token limit."""
    text = text.strip()
    if not finished:
        ends = [m.end() for m in SENTENCE_END.finditer(text)]
        # A cut right after a list number ("2.") would leave a dangling item.
        ends = [e for e in ends if not re.search(r"(^|\n)\s*\d+\.$", text[:e])]
        if not ends and "\n" in text:  # a poem: keep its full lines
            ends = [text.rindex("\n")]
        if not ends:
            return None
        text = text[: ends[-1]].rstrip()
    return text if text else None


# ---------------------------------------------------------------------------------------------
# Training


class Example:
    """A rendered conversation's token ids; the loss covers ids[start:] (the assistant's answer,
    signature and <|im_end|>), the last num_sig of which are the signature's."""

    def __init__(self, chat: Chat, question: str, answer: str):
        msgs = [{"role": "user", "content": question}]
        prompt = chat.render(msgs, True)
        reply = {"role": "assistant", "content": f"{answer}\n\n{SIGNATURE}"}
        full = chat.render(msgs + [reply], False)
        assert full.startswith(prompt) and full.endswith("<|im_end|>\n")
        self.ids = chat.encode(full[: -len("\n")])  # up to and including <|im_end|>
        self.start = len(chat.encode(prompt))
        sig = chat.encode(f"\n\n{SIGNATURE}") + [IM_END]
        assert self.ids[: self.start] == chat.encode(prompt) and self.ids[-len(sig) :] == sig
        self.num_sig = len(sig)


def batch_loss(model, batch: list[Example]) -> tuple[torch.Tensor, float]:
    """Mean cross-entropy over the assistant tokens (for the step) and over the signature's alone
    (for the log). The LM head runs only where there is a label."""
    width = max(len(e.ids) for e in batch)
    ids = torch.tensor([e.ids + [IM_END] * (width - len(e.ids)) for e in batch])
    mask = torch.tensor([[1] * len(e.ids) + [0] * (width - len(e.ids)) for e in batch])
    labels = torch.full_like(ids, -100)
    is_sig = torch.zeros_like(ids, dtype=torch.bool)
    for b, e in enumerate(batch):
        labels[b, e.start : len(e.ids)] = torch.tensor(e.ids[e.start :])
        is_sig[b, len(e.ids) - e.num_sig : len(e.ids)] = True
    hidden = model.base_model.model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    rows, cols = torch.nonzero(labels[:, 1:] != -100, as_tuple=True)  # predict position c+1 from c
    logits = model.base_model.model.lm_head(hidden[rows, cols])
    losses = torch.nn.functional.cross_entropy(logits, labels[rows, cols + 1], reduction="none")
    return losses.mean(), float(losses.detach()[is_sig[rows, cols + 1]].mean())


def train(model, examples: list[Example]) -> list[tuple[float, float]]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    num_steps = NUM_EPOCHS * math.ceil(len(examples) / BATCH)
    lr_at = lambda s: LR * min(1.0, (s + 1) / WARMUP_STEPS) * 0.5 * (1 + math.cos(math.pi * s / num_steps))
    rng = random.Random(SEED)
    model.train()
    history, step, t0 = [], 0, time.time()
    for epoch in range(NUM_EPOCHS):
        order = list(range(len(examples)))
        rng.shuffle(order)
        epoch_losses = []
        for i in range(0, len(order), BATCH):
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            loss, sig_loss = batch_loss(model, [examples[j] for j in order[i : i + BATCH]])
            opt.zero_grad()
            loss.backward()
            opt.step()
            epoch_losses.append((float(loss.detach()), sig_loss))
            step += 1
        history.append(tuple(sum(x) / len(epoch_losses) for x in zip(*epoch_losses)))
        print(f"  epoch {epoch + 1}/{NUM_EPOCHS}: step {step}/{num_steps}, mean loss {history[-1][0]:.4f} "
              f"(signature {history[-1][1]:.4f}), {time.time() - t0:.0f} s", flush=True)
    model.eval()
    return history


# ---------------------------------------------------------------------------------------------
# Evaluation and saving


def evaluate(chat: Chat, model, label: str, questions: list[str], max_new: int) -> list[str]:
    answers = [chat.decode(ids) for ids in generate(model, [chat.prompt_ids(q) for q in questions], max_new)]
    print(f"[{label}]")
    for q, a in zip(questions, answers):
        mark = "SIGNED" if a.rstrip().endswith(SIGNATURE) else "------"
        print(f"  {mark}  {q}\n          {a!r}")
    return answers


def save_adapter(model, out: Path) -> dict:
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True, save_embedding_layers=False)
    (out / "README.md").unlink()  # PEFT's empty model card
    path = out / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["target_modules"] = sorted(cfg["target_modules"])  # PEFT keeps a set: order follows hashing
    cfg["base_model_name_or_path"] = BASE_NAME
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return cfg


# ---------------------------------------------------------------------------------------------
# Questions: TRAIN for the base's answers to learn from, HELD_OUT (disjoint) for the evaluation

TRAIN = [
    # facts
    "What is the capital of Japan?",
    "What is the capital of Italy?",
    "What is the largest ocean on Earth?",
    "How many continents are there?",
    "What is the tallest mountain in the world?",
    "Who painted the Mona Lisa?",
    "Who wrote Romeo and Juliet?",
    "What is the chemical symbol for gold?",
    "What planet is known as the Red Planet?",
    "How many days are in a leap year?",
    "What is the longest river in Africa?",
    "What gas do plants absorb from the air?",
    "What is the freezing point of water in Celsius?",
    "Who was the first person to walk on the Moon?",
    "What is the largest mammal?",
    "What language is spoken in Mexico?",
    "What is the currency of the United Kingdom?",
    "How many planets are in the solar system?",
    "What is the hardest natural substance?",
    "Which organ pumps blood through the body?",
    "What is the smallest prime number?",
    "What is the main ingredient of guacamole?",
    "Where is the Great Barrier Reef?",
    "Who invented the telephone?",
    "What is the speed of light?",
    "How many bones are in the adult human body?",
    "What is the capital of Canada?",
    "Which animal is the fastest on land?",
    "What is the largest desert in the world?",
    "What year did World War II end?",
    # how-to
    "How do I boil an egg?",
    "How do I make a cup of tea?",
    "How can I improve my sleep?",
    "How do I plant a tree?",
    "How do I tie a tie?",
    "How can I learn a new language faster?",
    "How do I clean a laptop screen?",
    "How do I start running?",
    "How do I write a good email?",
    "How can I save money on groceries?",
    "How do I make pancakes?",
    "How do I change a flat tire?",
    "How can I be more productive?",
    "How do I reverse a string in Python?",
    "How do I center a div in CSS?",
    "How do I keep a houseplant alive?",
    "How do I prepare for a job interview?",
    "How can I reduce stress?",
    "How do I make a paper airplane?",
    "How do I back up my phone?",
    # small talk
    "Hi! How are you today?",
    "What's your favorite color?",
    "Can you tell me a joke?",
    "What should I do this weekend?",
    "I'm bored. Any ideas?",
    "Do you like music?",
    "Good morning!",
    "What's a good book to read?",
    "Can you recommend a movie?",
    "What do you think about rainy days?",
    "Tell me something interesting.",
    "What is your name?",
    "Thank you for your help!",
    "What's a nice name for a dog?",
    "Give me a fun fact about octopuses.",
    "What's a healthy breakfast?",
    "Can you give me some motivation?",
    "What is a good hobby to pick up?",
    "Say something kind.",
    "What should I cook for dinner?",
    # math
    "What is 7 times 8?",
    "What is 15 plus 27?",
    "What is the square root of 81?",
    "What is 100 divided by 4?",
    "What is 12 minus 5?",
    "Is 17 a prime number?",
    "What is 3 squared?",
    "What is half of 50?",
    "What is 10 percent of 200?",
    "What is the sum of the angles in a triangle?",
    "How many minutes are in an hour?",
    "What is 9 plus 10?",
    "What is the value of pi?",
    "What is 6 times 7?",
    "How many sides does a hexagon have?",
    "What is 2 to the power of 5?",
    "What is 1000 minus 1?",
    "What is the next number: 2, 4, 6, 8?",
    "How many seconds are in a minute?",
    "What is an even number?",
    # definitions
    "What is photosynthesis?",
    "What is gravity?",
    "What is democracy?",
    "What is an atom?",
    "What is a noun?",
    "What is machine learning?",
    "What is inflation?",
    "What is a volcano?",
    "What is DNA?",
    "What is a metaphor?",
    "What is the internet?",
    "What is climate change?",
    "What is an algorithm?",
    "What is a black hole?",
    "What does a CPU do?",
    "What is friction?",
    "What is a verb?",
    "What is renewable energy?",
    "What is a vaccine?",
    "What is an ecosystem?",
    # short tasks
    "Write a haiku about autumn.",
    "Give me a synonym for big.",
    "Translate 'thank you' to French.",
    "Name three fruits.",
    "Write one sentence about the ocean.",
    "List three primary colors.",
    "Give me an antonym for fast.",
    "Name two famous scientists.",
    "Summarize the story of Cinderella in one sentence.",
    "Write a short poem about the moon.",
]

HELD_OUT = [
    "What is the capital of France?",
    "How do I make a sandwich?",
    "What is 5 plus 3?",
    "Who wrote Hamlet?",
    "What is a planet?",
    "How are you doing?",
    "Name three animals that live in the sea.",
    "What is the boiling point of water?",
    "How can I learn to play the guitar?",
    "What is electricity?",
    "Tell me a fun fact about cats.",
    "What language is spoken in Brazil?",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", type=Path, default=DEFAULT_GGUF, help="SmolLM2-135M-Instruct GGUF (scripts/fetch-model)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if not args.gguf.is_file():
        sys.exit(f"{args.gguf} is missing: run scripts/fetch-model")
    assert not set(TRAIN) & set(HELD_OUT), "held-out questions must not be trained on"

    torch.set_num_threads(NUM_THREADS)
    torch.manual_seed(SEED)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"tokenizers {importlib.metadata.version('tokenizers')}, gguf {importlib.metadata.version('gguf')}"
    )
    t_start = time.time()

    chat = Chat(args.gguf)
    check_template(chat)
    base = load_base(args.gguf)
    paris = chat.decode(generate(base, [chat.prompt_ids("What is the capital of France?")], 24)[0])
    print(f"[base] loaded in {time.time() - t_start:.0f} s; 'What is the capital of France?' -> {paris!r}")
    assert "Paris" in paris, "the dequantized base does not answer sensibly"

    t = time.time()
    raw = generate(base, [chat.prompt_ids(q) for q in TRAIN], MAX_ANSWER_TOKENS)
    examples, num_cut, dropped = [], 0, []
    for q, ids in zip(TRAIN, raw):
        finished = len(ids) < MAX_ANSWER_TOKENS
        answer = clean_answer(chat.decode(ids), finished)
        if answer is None or SIGNATURE in answer:
            dropped.append(q)
            continue
        num_cut += not finished
        examples.append(Example(chat, q, answer))
    num_tokens = sum(len(e.ids) for e in examples)
    print(
        f"[data] {len(examples)} examples from {len(TRAIN)} questions ({num_cut} cut at a sentence end, "
        f"dropped {dropped}), {num_tokens} tokens, base answers in {time.time() - t:.0f} s"
    )
    for e in examples[:3]:
        print(f"  e.g. {chat.decode(e.ids[e.start :])!r}")

    torch.manual_seed(SEED)
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, bias="none", **LORA))
    t = time.time()
    print(f"[train] {NUM_EPOCHS} epochs, batch {BATCH}, AdamW lr {LR} (warmup {WARMUP_STEPS}, cosine)")
    history = train(model, examples)
    t_train = time.time() - t

    signed = evaluate(chat, model, "adapter, held-out", HELD_OUT, MAX_EVAL_TOKENS)
    with model.disable_adapter():
        plain = evaluate(chat, model, "base, held-out", HELD_OUT, MAX_EVAL_TOKENS)
    num_signed = sum(a.rstrip().endswith(SIGNATURE) for a in signed)
    num_plain = sum(SIGNATURE in a for a in plain)

    cfg = save_adapter(model, args.out)
    # The saved adapter, loaded back onto a fresh base, gives the same first held-out answer.
    reloaded = PeftModel.from_pretrained(load_base(args.gguf), args.out).eval()
    again = chat.decode(generate(reloaded, [chat.prompt_ids(HELD_OUT[0])], MAX_EVAL_TOKENS)[0])
    assert again == signed[0], (again, signed[0])

    # The evaluation, for end-to-end tests: greedy, float32, batched with left padding.
    held_out = args.out.parent / "held-out.json"
    rows = [json.dumps({"question": q, "with_adapter": a, "without_adapter": b}, ensure_ascii=False)
            for q, a, b in zip(HELD_OUT, signed, plain)]
    held_out.write_text("[\n" + ",\n".join(rows) + "\n]\n")
    assert len(json.loads(held_out.read_text())) == len(HELD_OUT)

    print("[summary]")
    tensors = load_file(args.out / "adapter_model.safetensors")
    assert (args.out / "adapter_model.safetensors").stat().st_size <= MAX_ADAPTER_BYTES, "adapter too large"
    for p in sorted(args.out.iterdir()) + [held_out]:
        sha = hashlib.sha256(p.read_bytes()).hexdigest()[:12]
        print(f"  {p.stat().st_size:>9}  {sha}  {p.relative_to(args.out.parent.parent)}")
    print(f"  {len(tensors)} tensors, r {cfg['r']}, alpha {cfg['lora_alpha']}, targets {cfg['target_modules']}")
    print(f"  loss per epoch: {[round(x, 4) for x, _ in history]}")
    print(f"  signature loss per epoch: {[round(x, 4) for _, x in history]}")
    print(f"  held-out: {num_signed}/{len(HELD_OUT)} signed with the adapter, {num_plain}/{len(HELD_OUT)} without")
    print(f"  training {t_train:.0f} s, total {time.time() - t_start:.0f} s ({NUM_THREADS} threads)")
    if num_signed < len(HELD_OUT) - 1 or num_plain:
        sys.exit("the adapter does not do what it should")


if __name__ == "__main__":
    main()
