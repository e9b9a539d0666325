"""What a text run (``task: embed``) needs beyond a classifier's: the embedding width,
pretrained teachers' weights, one token stream for teacher and student, student init.

- The embedding width plays the part of ``num_classes``: the teacher's output width
  (`embedding_width`), set on the splits by `run_splits`, the one way runs load data.
- A pretrained family (``hf_encoder``) brings its weights from its model directory:
  `weights_ref` is ``spec.weights`` or that directory's ``model.safetensors``, so the
  checks, lineage and cache keys that need "the teacher's weights" see a file.
- Teacher and student read the same token ids, so every text model's tokenizer
  (``args.path`` / ``args.tokenizer``) must be the data's (`check_tokenizers`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd.config import Experiment, ModelSpec
from kd.errors import InputError
from kd.models.tokens import load_tokenizer, model_dir

PRETRAINED = ("hf_encoder",)  # families that load their own weights from args.path
HF_WEIGHTS = ("model.safetensors",)


def pretrained_file(spec: ModelSpec) -> str | None:
    """The weights file a pretrained family loads (``args.path``'s model.safetensors),
    or None for every other model."""
    if spec.model not in PRETRAINED or "path" not in spec.args:
        return None
    d = model_dir(str(spec.args["path"]))
    for name in HF_WEIGHTS:
        if (d / name).is_file():
            return str(d / name)
    raise InputError(f"{spec.args['path']}: the model directory has no {HF_WEIGHTS[0]} "
                     "(kdflow loads weights from safetensors only)")


def weights_ref(spec: ModelSpec | None) -> str | None:
    """``spec.weights``, else a pretrained family's own weights file, else None."""
    if spec is None:
        return None
    return spec.weights or pretrained_file(spec)


def tokenizer_ref(spec: ModelSpec) -> str | None:
    """The tokenizer a text model names: ``args.tokenizer``, else a pretrained family's
    ``args.path``; None when it names none."""
    ref = spec.args.get("tokenizer") or (spec.args.get("path") if spec.model in PRETRAINED else None)
    return None if ref is None else str(ref)


def check_tokenizers(exp: Experiment) -> None:
    """Every text model of the run must use the data's tokenizer (same vocabulary and
    normaliser: `TextTokenizer.fingerprint`), and its ``args.vocab_size`` (if set) must
    hold every id; otherwise one line naming the model's field and both tokenizers."""
    if exp.data.text is None or exp.data.text.tokenizer is None:
        return
    data_tok = load_tokenizer(exp.data.text.tokenizer)
    specs = [("student", exp.student)] if exp.student is not None else []
    if exp.teacher is not None:
        specs += [("teacher", exp.teacher)] + [(f"teacher.teachers.{i}", t)
                                              for i, t in enumerate(exp.teacher.teachers)]
    for field, spec in specs:
        if spec is None:
            continue
        ref = tokenizer_ref(spec)
        if ref is not None:
            tok = load_tokenizer(ref)
            if tok.fingerprint != data_tok.fingerprint:
                raise InputError(
                    f"{field}: its tokenizer {ref} (vocabulary {tok.vocab_size}, fingerprint "
                    f"{tok.fingerprint}) differs from the data's {exp.data.text.tokenizer} "
                    f"(vocabulary {data_tok.vocab_size}, fingerprint {data_tok.fingerprint}); "
                    "teacher and student read the same token ids, so they need one tokenizer")
        vocab = spec.args.get("vocab_size")
        if isinstance(vocab, int) and vocab < data_tok.vocab_size:
            raise InputError(f"{field}.args.vocab_size: {vocab} is smaller than the tokenizer's "
                             f"vocabulary of {data_tok.vocab_size}")


def embedding_width(exp: Experiment, sample: torch.Tensor) -> int:
    """The teacher's embedding width: ``hidden_size`` of a pretrained model's config, the
    ``kd.num_classes`` its weights file records (a kdflow-trained teacher, whose output
    width is that number), or the output width of one forward of ``sample`` through the
    built teacher."""
    if exp.teacher is None:
        raise InputError("task: embed needs a teacher: its embeddings are the targets")
    if exp.teacher.model in PRETRAINED and "path" in exp.teacher.args:
        cfg = json.loads((model_dir(str(exp.teacher.args["path"])) / "config.json").read_text())
        if "hidden_size" in cfg:
            return int(cfg["hidden_size"])
    if exp.teacher.weights:
        from kd.models.weights import read_metadata, resolve

        path = resolve(exp.teacher.weights)
        width = read_metadata(path).get("kd.num_classes", "") if path.suffix == ".safetensors" else ""
        if width.isdigit():
            return int(width)
    from kd.train.assemble import build_spec

    model = build_spec(exp.teacher, "teacher", tuple(sample.shape[1:]), 1, load_weights=True)
    model.eval()
    with torch.no_grad():
        return int(model(sample).shape[-1])


def run_splits(exp: Experiment) -> Any:
    """The experiment's data (`kd.data.load_splits`); for ``task: embed`` with the
    teacher's embedding width as ``num_classes``, after `check_tokenizers`."""
    from kd.data import load_splits

    if exp.task == "embed":
        if exp.data.text is None:
            raise InputError("task: embed: set data.text (the text column and tokenizer)")
        check_tokenizers(exp)
    splits = load_splits(exp.data, exp.storage.endpoint_url)
    if exp.task != "embed":
        return splits
    sample = torch.as_tensor(splits.train.sample(2).x, dtype=torch.int64)
    return dataclasses.replace(splits, num_classes=embedding_width(exp, sample))


def pad_id(exp: Experiment) -> int:
    """The data tokenizer's pad id (0 when the data is not text)."""
    if exp.data.text is None or exp.data.text.tokenizer is None:
        return 0
    return load_tokenizer(exp.data.text.tokenizer).pad_id


def text_metadata(exp: Experiment) -> dict[str, str]:
    """Weights-file metadata of an embed model: ``kd.task`` and ``kd.text`` (max_length,
    pad_id, tokenizer reference and fingerprint); empty for classifiers."""
    if exp.task != "embed" or exp.data.text is None or exp.data.text.tokenizer is None:
        return {}
    tok = load_tokenizer(exp.data.text.tokenizer)
    return {"kd.task": "embed",
            "kd.text": json.dumps({"max_length": exp.data.text.max_length, "pad_id": tok.pad_id,
                                   "tokenizer": exp.data.text.tokenizer,
                                   "fingerprint": tok.fingerprint})}


def init_text_student(exp: Experiment, student: nn.Module, teacher: nn.Module,
                      sample: torch.Tensor) -> None:
    """``student.init: teacher_layers`` (DistilBERT-style layer copy; a narrower FFN keeps
    the neurons most active on ``sample``, the run's sample batch) or ``model2vec``
    (static embeddings distilled from the teacher's vocabulary, no corpus)."""
    from kd.data.base import data_cache_root
    from kd.train import textinit

    assert exp.student is not None
    if exp.student.init == "teacher_layers":
        textinit.init_teacher_layers(student, teacher, exp.student.init_layers, sample)
    elif exp.student.init == "model2vec":
        if exp.data.text is None or exp.data.text.tokenizer is None:
            raise InputError("student.init: model2vec needs data.text (the tokenizer whose "
                             "vocabulary goes through the teacher)")
        textinit.init_model2vec(student, teacher, load_tokenizer(exp.data.text.tokenizer),
                                Path(data_cache_root()).parent / "model2vec")
