"""Initialising a text student from its teacher (``student.init``).

``teacher_layers`` (DistilBERT, Sanh et al. 2019): the student BERT takes the teacher's
embeddings (word, position, token type, LayerNorm) and, for each student layer ``j``, the
whole teacher layer ``layers[j]``. Default map: evenly spaced over the teacher's depth,
first and last layer included, ``layers[j] = floor(j * (n_t - 1) / (n_s - 1) + 1/2)``
(6 -> 3: [0, 3, 5]; 6 -> 2: [0, 5]; n -> 1: [n - 1]; n -> n: identity). Measured on
MiniLM-L6 (mean cosine of the initialised 3-layer student to the teacher, 100 sentences):
[0, 3, 5] 0.61, [3, 4, 5] 0.60, [1, 3, 5] 0.46, [0, 2, 4] (DistilBERT's every other
layer) 0.36, [0, 1, 2] 0.28; for 2 layers [0, 5] 0.36, [2, 5] 0.29, [0, 3] 0.26.
A student with a narrower feed-forward block (``args.intermediate`` ``I_s`` below the
teacher's ``I_t``; hidden size and heads must match) keeps, in each copied layer, the
``I_s`` FFN neurons of highest importance ``s_i = mean_tokens |GELU(x W_in_i + b_i)| *
||W_out[:, i]||_2`` (the mean activation of neuron ``i`` over the non-pad tokens of the
run's sample batch, the same rows on every rank, times the size of what it writes back),
in their original order: ``W_in[keep]``, ``b_in[keep]``, ``W_out[:, keep]``. Measured on
MiniLM-L6 (mean cosine to the teacher of the initialised 3-layer ``[0, 3, 5]`` student,
200 held-out sentences): ``I_s`` 512 0.52 with the activation from 200 sentences, 0.51
from 4, 0.47 by weight norms alone (``||W_in_i|| ||W_out[:, i]||``); 768: 0.57; 1536: 0.67.

``model2vec`` (Tulkens & van Dongen 2024), no corpus: every vocabulary token ``t`` is run
through the teacher alone as ``[CLS] t [SEP]`` and mean-pooled like a sentence (the
teacher's own pooling, before its L2 normalisation), giving ``X [V, H]``. PCA to the
student's ``dim``: ``mu = mean(X)``, ``C [dim, H]`` the top right singular vectors of
``X - mu``, ``Z = (X - mu) C^T``. SIF weighting with a Zipf prior over the vocabulary
rank, taking the token id as the rank (WordPiece/BPE vocabularies are stored roughly by
frequency; model2vec assumes the same): ``p(r) = (1 / (r + 2)) / sum_k 1 / (k + 2)`` and
``w(r) = a / (a + p(r))`` with ``a = 1e-4`` (model2vec's default). The student's table is
``E[t] = w(t) Z[t]`` (the pad row 0) and its projection ``P(z) = C^T z`` (bias 0) maps the
output back into the teacher's space. Without a projection (dim == H) ``E[t] = w(t) (X[t] - mu)``.
The mean ``mu`` is left out on purpose: every token vector carries the same large
``[CLS] . [SEP]`` component that real sentences do not. Measured on MiniLM-L6 (mean cosine
of the initialised dim-256 student to the teacher; 52 simple / 100 technical sentences):
a = 1e-3: 0.52 / 0.34, a = 1e-4: 0.60 / 0.40, a = 1e-5: 0.66 / 0.49; with the bias = mu
(a = 1e-3) 0.20 / 0.20; pooling only the token's own output 0.57 / 0.40 (a = 1e-4).
The result is cached in ``cache_dir`` as safetensors keyed by the teacher's weights, the
tokenizer's fingerprint, the student's widths and ``a``; computing it (30522 three-token
sequences through the teacher) takes 15 s on 2 CPU cores (75-170 s when they are busy),
reading it 0.1 s.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..models.tokens import TextTokenizer

log = logging.getLogger(__name__)

SIF_A = 1e-4
BATCH = 1024
VERSION = "m2v-2"


def _layers(model: nn.Module) -> nn.ModuleList:
    try:
        return model.bert.encoder.layer
    except AttributeError:
        raise InputError(f"student.init: {type(model).__name__} has no BERT encoder (bert.encoder.layer); "
                         "teacher_layers needs hf_encoder/bert_student") from None


def default_layer_map(n_teacher: int, n_student: int) -> list[int]:
    """Evenly spaced teacher layers, first and last included (module docstring)."""
    if n_student == 1:
        return [n_teacher - 1]
    return [int(j * (n_teacher - 1) / (n_student - 1) + 0.5) for j in range(n_student)]


def _check_shapes(student: nn.Module, teacher: nn.Module) -> None:
    s, t = student.bert.config, teacher.bert.config
    pairs = [("hidden size", s.hidden_size, t.hidden_size), ("heads", s.num_attention_heads, t.num_attention_heads)]
    for what, a, b in pairs:
        if a != b:
            raise InputError(f"student.width: init teacher_layers needs the teacher's {what} ({b}), "
                             f"the student has {a} (set student.width and args to match)")
    if s.intermediate_size > t.intermediate_size:
        raise InputError(f"student.args.intermediate: init teacher_layers keeps at most the teacher's "
                         f"{t.intermediate_size} feed-forward neurons, the student has {s.intermediate_size}")
    if s.vocab_size != t.vocab_size:
        raise InputError(f"student.args.vocab_size: init teacher_layers needs the teacher's vocabulary "
                         f"({t.vocab_size}), got {s.vocab_size}")
    if s.max_position_embeddings > t.max_position_embeddings:
        raise InputError(f"student.args.max_len: {s.max_position_embeddings} exceeds the teacher's "
                         f"{t.max_position_embeddings} positions")


def _check_map(layers: list[int] | None, n_teacher: int, n_student: int) -> list[int]:
    if layers is None:
        return default_layer_map(n_teacher, n_student)
    if len(layers) != n_student:
        raise InputError(f"student.init_layers: {len(layers)} indices for a student of {n_student} layers")
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_teacher:
            raise InputError(f"student.init_layers: index {i!r} is outside the teacher's {n_teacher} layers "
                             f"(0..{n_teacher - 1})")
    return list(layers)


@torch.no_grad()
def ffn_importance(teacher: nn.Module, layers: list[int], sample: Tensor) -> dict[int, Tensor]:
    """``s_i`` (module docstring) of every FFN neuron of each teacher layer in ``layers``:
    one teacher forward over ``sample`` (token ids ``[B, L]``), hooks on the layers' GELU outputs."""
    t_layers, acts = _layers(teacher), {}
    hooks = [t_layers[i].intermediate.register_forward_hook(
        lambda _m, _inp, out, i=i: acts.__setitem__(i, out.detach())) for i in set(layers)]
    was = teacher.training
    teacher.eval()
    try:
        teacher(sample)
    finally:
        teacher.train(was)
        for h in hooks:
            h.remove()
    keep = sample != getattr(teacher, "pad_id", 0)
    return {i: acts[i][keep].abs().float().mean(0) * t_layers[i].output.dense.weight.norm(dim=0)
            for i in acts}


def _pruned_state(layer: nn.Module, keep: Tensor) -> dict[str, Tensor]:
    """``layer``'s state with only the FFN neurons ``keep``."""
    sd = dict(layer.state_dict())
    for key in ("intermediate.dense.weight", "intermediate.dense.bias"):
        sd[key] = sd[key][keep]
    sd["output.dense.weight"] = sd["output.dense.weight"][:, keep]
    return sd


@torch.no_grad()
def init_teacher_layers(student: nn.Module, teacher: nn.Module, layers: list[int] | None,
                        sample: Tensor | None = None) -> list[int]:
    """Copy the teacher's embeddings and layers ``layers[j] -> student layer j`` (module
    docstring); returns the map used. A student with fewer FFN neurons keeps each layer's
    most important ones, ranked on ``sample`` (token ids, required then). Shapes that differ
    are an `InputError` naming ``student.width`` (or the arg), a bad map one naming
    ``student.init_layers``."""
    t_layers, s_layers = _layers(teacher), _layers(student)
    _check_shapes(student, teacher)
    mapping = _check_map(layers, len(t_layers), len(s_layers))
    t_emb, s_emb = teacher.bert.embeddings, student.bert.embeddings
    for name in ("word_embeddings", "token_type_embeddings", "LayerNorm"):
        getattr(s_emb, name).load_state_dict(getattr(t_emb, name).state_dict())
    n_pos = s_emb.position_embeddings.weight.shape[0]
    s_emb.position_embeddings.weight.copy_(t_emb.position_embeddings.weight[:n_pos])
    width = student.bert.config.intermediate_size
    scores = None
    if width < teacher.bert.config.intermediate_size:
        if sample is None:
            raise ValueError("init_teacher_layers: a narrower FFN needs a sample batch to rank neurons")
        scores = ffn_importance(teacher, mapping, sample)
    for j, i in enumerate(mapping):
        state = t_layers[i].state_dict() if scores is None else \
            _pruned_state(t_layers[i], scores[i].topk(width).indices.sort().values)
        s_layers[j].load_state_dict(state)
    return mapping


def sif_weights(vocab_size: int, a: float = SIF_A) -> Tensor:
    """``w(r) = a / (a + p(r))``, ``p`` Zipf over rank ``r`` = token id (module docstring)."""
    inv = 1.0 / torch.arange(2, vocab_size + 2, dtype=torch.float64)
    return (a / (a + inv / inv.sum())).float()


def _specials(tokenizer: TextTokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text (``[CLS]``, ``[SEP]`` for BERT)."""
    ids, _ = tokenizer.encode([""], 16)
    seq = [int(i) for i in ids[0] if i != tokenizer.pad_id]
    return seq[:1], seq[1:]


@torch.no_grad()
def token_vectors(teacher: nn.Module, tokenizer: TextTokenizer, batch: int = BATCH) -> Tensor:
    """``X [V, H]``: the teacher's pooled, unnormalised embedding of ``[CLS] t [SEP]`` per token."""
    pool = getattr(teacher, "pool", teacher)
    bos, eos = _specials(tokenizer)
    ids = torch.arange(tokenizer.vocab_size, dtype=torch.long)[:, None]
    seqs = torch.cat([torch.tensor(bos, dtype=torch.long).expand(len(ids), -1), ids,
                      torch.tensor(eos, dtype=torch.long).expand(len(ids), -1)], dim=1)
    seqs[tokenizer.pad_id, len(bos)] = bos[0] if bos else tokenizer.pad_id  # the pad row is zeroed later
    was = teacher.training
    teacher.eval()
    try:
        out = torch.cat([pool(seqs[i:i + batch]).float() for i in range(0, len(seqs), batch)])
    finally:
        teacher.train(was)
    return out


def pca(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """``(C [dim, H], mu [H])``: the top ``dim`` principal directions of ``x`` and its mean."""
    mu = x.mean(0)
    _, _, vh = torch.linalg.svd((x - mu).double(), full_matrices=False)
    return vh[:dim].float(), mu


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 (16 hex) over the names and bytes of ``model``'s state dict."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _static_parts(student: nn.Module, tokenizer: TextTokenizer, hidden: int) -> tuple[int, nn.Linear | None]:
    """The student's table width and projection, checked against tokenizer and teacher."""
    embed = getattr(student, "embed", None)
    if not isinstance(embed, (nn.Embedding, nn.EmbeddingBag)):
        raise InputError(f"student.init: model2vec needs a static_embed student, got {type(student).__name__}")
    vocab, dim = embed.weight.shape
    if vocab != tokenizer.vocab_size:
        raise InputError(f"student.args.vocab_size: {vocab} differs from the tokenizer's {tokenizer.vocab_size}")
    proj = getattr(student, "proj", None)
    out = proj.out_features if proj is not None else dim
    if out != hidden:
        raise InputError(f"student.init: model2vec needs the student's output width ({out}) equal to the "
                         f"teacher's embedding width ({hidden})")
    if dim > hidden:
        raise InputError(f"student.args.dim: model2vec init needs dim <= the teacher's width {hidden}, got {dim}")
    return dim, proj


def _compute_table(teacher: nn.Module, tokenizer: TextTokenizer, dim: int, project: bool) -> dict[str, Tensor]:
    """The model2vec table (and projection when ``project``) as named tensors."""
    t0 = time.perf_counter()
    x = token_vectors(teacher, tokenizer)
    w = sif_weights(len(x))[:, None]
    if project:
        comps, mu = pca(x, dim)
        out = {"table": w * ((x - mu) @ comps.T), "proj.weight": comps.T.contiguous(),
               "proj.bias": torch.zeros(len(mu))}
    else:  # the table is in the teacher's space already
        out = {"table": w * (x - x.mean(0))}
    out["table"][tokenizer.pad_id] = 0.0
    log.info("model2vec: %d token vectors -> dim %d in %.1fs", len(x), dim, time.perf_counter() - t0)
    return {k: v.contiguous() for k, v in out.items()}


def cache_path(teacher: nn.Module, tokenizer: TextTokenizer, dim: int, out: int, cache_dir: Path) -> Path:
    """Where the model2vec table for this teacher, tokenizer and student widths is cached."""
    key = f"{VERSION}|{weights_fingerprint(teacher)}|{tokenizer.fingerprint}|{dim}|{out}|{SIF_A}"
    return Path(cache_dir) / f"model2vec-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"


@torch.no_grad()
def init_model2vec(student: nn.Module, teacher: nn.Module, tokenizer: TextTokenizer, cache_dir: Path) -> None:
    """Fill a static_embed student from the teacher, model2vec-style (module docstring);
    the table is read from ``cache_dir`` when cached, else computed and written there."""
    from safetensors.torch import load_file, save_file

    probe = torch.tensor([[tokenizer.pad_id + 1 if tokenizer.pad_id + 1 < tokenizer.vocab_size else 0]])
    hidden = int(getattr(teacher, "pool", teacher)(probe).shape[-1])
    dim, proj = _static_parts(student, tokenizer, hidden)
    path = cache_path(teacher, tokenizer, dim, hidden, cache_dir)
    if path.is_file():
        parts = load_file(str(path))
        log.info("model2vec: table read from %s", path)
    else:
        parts = _compute_table(teacher, tokenizer, dim, proj is not None)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        save_file(parts, str(tmp))
        os.replace(tmp, path)
    student.embed.weight.copy_(parts["table"])
    if proj is not None:
        proj.weight.copy_(parts["proj.weight"])
        proj.bias.copy_(parts["proj.bias"])
