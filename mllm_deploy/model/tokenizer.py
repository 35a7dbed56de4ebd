"""The model's tokenizer: a `tokenizers.Tokenizer` built from GGUF metadata or tokenizer.json.

GGUF byte-level BPE (`tokenizer.ggml.model == "gpt2"`) is rebuilt from
`tokenizer.ggml.tokens` / `tokenizer.ggml.merges` with the pre-tokenizer llama.cpp uses for
`tokenizer.ggml.pre`; control and user-defined tokens (`token_type` 3 and 4) become special
tokens, matched whole in the text. SentencePiece BPE vocabularies (`llama`, e.g. Gemma 3's) are
built by `spm_tokenizer`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from mllm_deploy.errors import user_error
from mllm_deploy.model.detokenize import StreamDecoder
from mllm_deploy.model.spec import ModelSpec
from mllm_deploy.model.spm_tokenizer import spm_tokenizer_from_gguf_metadata

# llama.cpp's split regexes per `tokenizer.ggml.pre` (the Llama 3 / Qwen2 ones as published
# with those models' tokenizer.json); GPT-2's own regex is ByteLevel(use_regex=True).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2()])


def _split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


# tokenizer.ggml.pre -> (pre-tokenizer factory, ignore_merges: whole-word vocab hits skip BPE)
PRE_TOKENIZERS: dict[str, tuple[Callable[[], pre_tokenizers.PreTokenizer], bool]] = {
    "gpt2": (_gpt2, False),
    "smollm": (_digits_then_gpt2, False),
    "starcoder": (_digits_then_gpt2, False),
    "refact": (_digits_then_gpt2, False),
    "llama-bpe": (lambda: _split_then_bytes(_LLAMA3_SPLIT), True),
    "qwen2": (lambda: _split_then_bytes(_QWEN2_SPLIT), False),
}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types that are matched whole


END_OF_GENERATION = frozenset(
    {"<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>", "</s>", "<end_of_turn>"}
)
"""Special tokens that end generation whichever of them the model file names as EOS."""


class ModelTokenizer:
    """Text <-> token ids for one model.

    `encode` never adds BOS unless asked (`add_bos=True`) or the model says so
    (`add_bos=None` uses the spec's `add_bos`; BOS is not doubled when the text starts with it).
    """

    def __init__(
        self, tokenizer: Tokenizer, *, bos_id: int | None, eos_ids: tuple[int, ...], add_bos: bool, origin: str
    ) -> None:
        self.tokenizer = tokenizer
        self.bos_id = bos_id
        self.add_bos = add_bos
        self.origin = origin  # the file the vocabulary came from
        added = tokenizer.get_added_tokens_decoder()
        self.special_ids = frozenset(idx for idx, tok in added.items() if tok.special)
        # the model's own EOS first (chat templates render it), then any other special token that
        # ends a text: SmolLM2 declares <|im_end|> but emits <|endoftext|> after raw prompts
        enders = sorted(idx for idx, tok in added.items() if tok.special and tok.content in END_OF_GENERATION)
        self.eos_ids = tuple(dict.fromkeys([*eos_ids, *enders]))
        self._lock = threading.Lock()  # encode_special_tokens is tokenizer-wide state

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tokenizer.id_to_token(token_id)

    def encode(self, text: str, *, allow_special: bool = True, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`. allow_special=False encodes "<|im_start|>" as plain text."""
        with self._lock:
            self.tokenizer.encode_special_tokens = not allow_special
            try:
                ids = self.tokenizer.encode(text, add_special_tokens=False).ids
            finally:
                self.tokenizer.encode_special_tokens = False
        want_bos = self.add_bos if add_bos is None else add_bos
        if want_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int], *, skip_special: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special)

    def stream(self, *, skip_special: bool = False) -> StreamDecoder:
        """A fresh incremental decoder (mllm_deploy.model.detokenize.StreamDecoder)."""
        return StreamDecoder(self, skip_special=skip_special)


def tokenizer_from_gguf_metadata(metadata: Mapping[str, object], file: str) -> Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` from GGUF `tokenizer.ggml.*` metadata."""
    model = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise user_error("the GGUF file has no tokenizer (tokenizer.ggml.tokens is missing)", file=file)
    if model == "llama":
        return spm_tokenizer_from_gguf_metadata(metadata, tokens, file)
    if model != "gpt2":
        raise user_error(
            f"{model!r} tokenizers in GGUF files are not supported; supported: byte-level BPE ('gpt2'), "
            "SentencePiece BPE ('llama')",
            file=file,
            key="tokenizer.ggml.model",
            hint="use the model's Hugging Face directory (tokenizer.json) instead",
        )
    pre = metadata.get("tokenizer.ggml.pre")
    if pre is None:  # llama.cpp then guesses a "default" split that matches no model's training
        raise user_error(
            "the GGUF file does not say which pre-tokenizer its vocabulary needs (tokenizer.ggml.pre is missing)",
            file=file,
            allowed=", ".join(PRE_TOKENIZERS),
            hint="re-convert the model with a current llama.cpp convert_hf_to_gguf.py, or use its Hugging Face directory",
        )
    if not isinstance(pre, str) or pre not in PRE_TOKENIZERS:
        raise user_error(
            f"unsupported pre-tokenizer {pre!r}", file=file, key="tokenizer.ggml.pre", allowed=", ".join(PRE_TOKENIZERS)
        )
    merges_raw = metadata.get("tokenizer.ggml.merges")
    if merges_raw is None:
        raise user_error("a BPE tokenizer needs tokenizer.ggml.merges, which is missing", file=file)
    if not isinstance(merges_raw, list):
        raise user_error("tokenizer.ggml.merges must be an array of strings", file=file)
    vocab: dict[str, int] = {}
    for idx, tok in enumerate(tokens):
        vocab.setdefault(tok, idx)
    merges: list[tuple[str, str]] = []
    for m in merges_raw:
        if not isinstance(m, str):
            raise user_error(f"malformed merge {m!r} in tokenizer.ggml.merges", file=file)
        left, sep, right = m.partition(" ")
        if not sep:
            raise user_error(f"malformed merge {m!r} in tokenizer.ggml.merges", file=file)
        merges.append((left, right))
    make_pre, ignore_merges = PRE_TOKENIZERS[pre]
    try:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges, fuse_unk=False))
    except Exception as exc:  # tokenizers raises plain Exception for a merge naming an unknown token
        raise user_error(f"inconsistent BPE vocabulary/merges: {exc}", file=file) from None
    tok.pre_tokenizer = make_pre()
    tok.decoder = decoders.ByteLevel()
    types = metadata.get("tokenizer.ggml.token_type")
    if types is not None and not isinstance(types, (list, np.ndarray)):
        raise user_error("tokenizer.ggml.token_type must be an array of integers", file=file)
    if types is not None:
        specials = [
            AddedToken(tokens[i], special=True, normalized=False)
            for i, t in enumerate(types)
            if int(t) in (CONTROL, USER_DEFINED) and i < len(tokens)
        ]
        tok.add_special_tokens(specials)
    return tok


def load_tokenizer(spec: ModelSpec) -> ModelTokenizer:
    """The tokenizer of a model: rebuilt from GGUF metadata, or loaded from tokenizer.json."""
    if spec.format == "gguf":
        # deferred on purpose: the gguf library loads only for GGUF models, not for tokenizer.json ones
        from mllm_deploy.model.gguf_file import GGUFFile  # noqa: PLC0415

        gfile = GGUFFile(Path(spec.path))
        try:
            tok = tokenizer_from_gguf_metadata(gfile.metadata, spec.path)
        finally:
            gfile.close()
        origin = spec.path
    else:
        path = Path(spec.path) / "tokenizer.json"
        try:
            tok = Tokenizer.from_file(str(path))
        except FileNotFoundError:
            raise user_error("missing tokenizer.json", file=str(path)) from None
        except Exception as exc:  # tokenizers reports parse errors as plain Exception
            raise user_error(f"cannot load tokenizer.json: {exc}", file=str(path)) from None
        origin = str(path)
    if tok.get_vocab_size(with_added_tokens=True) > spec.vocab:
        raise user_error(
            f"the tokenizer has {tok.get_vocab_size(with_added_tokens=True)} tokens but the model only {spec.vocab} embeddings",
            file=origin,
        )
    return ModelTokenizer(tok, bos_id=spec.bos_id, eos_ids=spec.eos_ids, add_bos=spec.add_bos, origin=origin)
