"""A SentencePiece BPE vocabulary from GGUF (`tokenizer.ggml.model = "llama"`) as a `tokenizers` BPE.

GGUF keeps SentencePiece's pieces and scores but not its merge list. SentencePiece BPE merges, at
each step, the adjacent pair whose joined piece scores highest; a `tokenizers` BPE merges the
pair of lowest rank. So every way of cutting a piece into two pieces of the vocabulary is a
merge, ranked by the joined piece's score (highest first): the same order, hence the same ids.
The rest follows SentencePiece as the model was trained (and as Gemma's own tokenizer.json does):
spaces become "▁" (with a leading one only when `tokenizer.ggml.add_space_prefix`), there is no
pre-split, text no piece covers falls back to its UTF-8 bytes (`<0xNN>` pieces), control pieces
(token type 3) are special tokens and user-defined ones (4: Gemma's newline and tab runs, HTML
tags) are matched whole, as SentencePiece matches user-defined symbols.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

from mllm_deploy.errors import user_error

SPACE = "\u2581"  # "▁", SentencePiece's visible space
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # llama.cpp token types


def spm_merges(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> list[tuple[str, str]]:
    """Every (left, right) split of a normal piece into two normal pieces, best-scoring join first."""
    vocab = {tok: i for i, tok in enumerate(tokens) if types[i] == NORMAL}
    ranked: list[tuple[float, int, str, str]] = []
    for piece, idx in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-float(scores[idx]), idx, left, right))
    ranked.sort()  # highest score first; a tie keeps the vocabulary's order
    return [(left, right) for _, _, left, right in ranked]


def spm_tokenizer_from_gguf_metadata(metadata: Mapping[str, object], tokens: list[str], file: str) -> Tokenizer:
    """The `tokenizers.Tokenizer` of a GGUF SentencePiece (BPE) vocabulary; see the module docstring."""
    scores = metadata.get("tokenizer.ggml.scores")
    types = metadata.get("tokenizer.ggml.token_type")
    for key, value in (("tokenizer.ggml.scores", scores), ("tokenizer.ggml.token_type", types)):
        if not isinstance(value, np.ndarray) or value.shape != (len(tokens),):
            raise user_error(
                f"a SentencePiece vocabulary needs {key} with one number per token ({len(tokens)})", file=file, key=key
            )
    assert isinstance(scores, np.ndarray) and isinstance(types, np.ndarray)  # checked just above
    type_list = [int(t) for t in types]
    missing_bytes = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in tokens]
    if missing_bytes:
        raise user_error(
            f"SentencePiece vocabularies without byte pieces are not supported (no {missing_bytes[0]})",
            file=file,
            key="tokenizer.ggml.tokens",
        )
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id", 0)
    unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None
    vocab: dict[str, int] = {}
    for idx, piece in enumerate(tokens):
        vocab.setdefault(piece, idx)
    merges = spm_merges(tokens, scores.tolist(), type_list)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    replace = normalizers.Replace(" ", SPACE)
    prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", False))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), replace]) if prefix else replace
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if prefix else [])
    )
    tok.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(type_list) if t == CONTROL]
    )
    tok.add_tokens(
        [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(type_list) if t == USER_DEFINED]
    )
    return tok
