"""Reference token ids for the default model's tokenizer, from an independent implementation.

Runs OUTSIDE the project venv, in a separate one with Hugging Face transformers:

    python3 -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install transformers gguf sentencepiece
    /tmp/refvenv/bin/python scripts/make_tokenizer_reference.py GGUF_FILE [OUT_JSON]
    /tmp/refvenv/bin/python scripts/make_tokenizer_reference.py GEMMA3_GGUF tests/golden/tokenizer_gemma3.json sentencepiece

transformers rebuilds the tokenizer from the GGUF metadata with its own converter
(`AutoTokenizer.from_pretrained(dir, gguf_file=name)`); we store, for varied texts, the
ids it produces without added BOS/EOS. tests/test_tokenizer.py
(test_default_model_matches_reference_ids) checks ours against them. OUT_JSON defaults to tests/golden/tokenizer_smollm2.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TEXTS = [
    "What is the capital of France?",
    "The capital of France is Paris.",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { sum += a[i] * b[i]; }",
    "Digits: 0 12 345 6789 3.14159 1,000,000 2024-06-01 0x1F",
    "Accents: café naïve résumé Ångström Zürich São Paulo señor",
    "CJK: 你好，世界！ 日本語のテキスト 한국어 문장",
    "Emoji: 🙂 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ 🤖",
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>x<file_sep>",
    "Whitespace   runs\t\ttabs   \n\n\n   and trailing   ",
    "\n\nleading newlines and   spaces",
    "  two leading spaces",
    "Mixed: I'm you're they'll we've it's SHE'S don't",
    "URL https://example.com/a/b?c=d&e=f#g and e-mail a.b@c.org",
    "Math: ∑_{i=1}^{n} x_i² ≤ ∞ — “quotes” ‘single’ …",
    "Ελληνικά, русский текст, עברית, العربية",
    "",
    " ",
    "a",
]
SENTENCEPIECE_TEXTS = [  # added for a SentencePiece vocabulary (Gemma 3): its specials, byte fallback, runs
    "<start_of_turn>user\nWhy is the sky blue?<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text after a literal bos",
    "Byte fallback: \u0378 \U000e0041 \U0010fffd \x00\x01\x7f end",
    "Runs:\n\n\n\n\n\t\t\t\t          x     y\r\n\r\n",
    "Numbers 1234567890 9,876.54 -0.001 1e-9 ½ ¾ ²³",
    "<table><tr><td>cell</td></tr></table> [multimodal] <start_of_image>",
    "日本語と中文和한국어を混ぜた文章です。Ελληνικά αβγ",
]


def main() -> int:
    from transformers import AutoTokenizer

    gguf_path = Path(sys.argv[1]).resolve()
    out = (
        Path(sys.argv[2])
        if len(sys.argv) > 2
        else Path(__file__).resolve().parent.parent / "tests/golden/tokenizer_smollm2.json"
    )
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    texts = TEXTS + (SENTENCEPIECE_TEXTS if "sentencepiece" in sys.argv[3:] else [])
    cases = [{"text": t, "ids": tok.encode(t, add_special_tokens=False)} for t in texts]
    import transformers

    doc = {
        "model_file": gguf_path.name,
        "reference": f"transformers {transformers.__version__} AutoTokenizer(gguf_file=...), add_special_tokens=False",
        "cases": cases,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = ",\n".join(json.dumps(c, ensure_ascii=False) for c in cases)  # one case per line
    head = json.dumps({k: v for k, v in doc.items() if k != "cases"}, ensure_ascii=False)[:-1]
    out.write_text(f'{head}, "cases": [\n{lines}\n]}}\n', encoding="utf-8")
    print(f"wrote {len(cases)} cases to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
