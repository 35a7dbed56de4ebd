#!/usr/bin/env python3
"""Reference greedy continuations and logits of Gemma 3 270M, from an independent implementation.

Hugging Face transformers (torch, CPU, float32) reads the same GGUF (dequantizing it itself) and
runs its own Gemma 3 code; nothing from mllm_deploy is imported. Run it outside the project venv:

    python3 -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install torch transformers gguf sentencepiece
    /tmp/refvenv/bin/python scripts/make_gemma3_reference.py GEMMA3_GGUF

Writes tests/golden/gemma3_reference.npz (keys in tests/test_gemma3_forward.py): for each prompt
its ids (BOS first), the greedy continuation, and the top logits at the last prompt position
and after each generated token. One prompt is longer than the 512-token sliding window.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

OUT = Path(__file__).resolve().parent.parent / "tests" / "golden" / "gemma3_reference.npz"
LONG = " ".join(
    f"Entry {i}: the {['red', 'green', 'blue', 'grey'][i % 4]} box on shelf {i * 7 % 13} holds {i * 3} marbles."
    for i in range(40)
)
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Les fleurs du jardin sont",
    LONG + " Question: how many marbles does the box of entry 2 hold? Answer:",
]
NEW_TOKENS = 8
TOP = 32


def main() -> int:
    gguf = Path(sys.argv[1]).resolve()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32)
    model.eval()
    arrays: dict[str, np.ndarray] = {}
    for p, text in enumerate(PROMPTS):
        ids = tok.encode(text, add_special_tokens=True)  # <bos> first, as the GGUF asks
        seq = list(ids)
        tops_ids, tops_vals = [], []
        with torch.no_grad():
            for _ in range(NEW_TOKENS):
                logits = model(torch.tensor([seq])).logits[0, -1].float().numpy()
                order = np.argsort(-logits)[:TOP]
                tops_ids.append(order)
                tops_vals.append(logits[order])
                seq.append(int(order[0]))
        arrays[f"p{p}_prompt"] = np.array(ids, np.int64)
        arrays[f"p{p}_greedy"] = np.array(seq[len(ids) :], np.int64)
        arrays[f"p{p}_top_ids"] = np.stack(tops_ids).astype(np.int64)  # [NEW_TOKENS, TOP]
        arrays[f"p{p}_top_logits"] = np.stack(tops_vals).astype(np.float32)
        print(p, len(ids), tok.decode(seq[len(ids) :]), flush=True)
    arrays["meta"] = np.array(
        [f"transformers {transformers.__version__}, torch {torch.__version__}, float32, {gguf.name}"]
    )
    np.savez_compressed(OUT, **arrays)
    print("wrote", OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
