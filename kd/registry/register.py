"""Register a finished run's student as an MLflow model version (alias ``challenger``).

The logged model directory (see docs/registry.md)::

    MLmodel             flavors: python_function (loader_module kdflow_model_loader,
                        model_config {precision: fp32}: `load_model(uri, model_config=...)`
                        may set bf16), pytorch (pt2)
    data/student/{model.safetensors,kd_model.json}  the weights of record + architecture
    data/student/tokenizer.json  (text embedding models: `kd.registry.embed`)
    code/kdflow_model_loader/...  kd.registry.loader and the model families (torch only)
    pt2/model.pt2       torch.export program, only for ``mlflow.pytorch.load_model``
    model_card.md       teacher vs student, recipe, lineage; plots/curves.png

Every version gets lineage tags (`LINEAGE_KEYS`) and its weights' sha256.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

import kd
from kd import sse
from kd.config import Experiment, load_experiment
from kd.errors import InputError
from kd.models.weights import WEIGHTS_FILE
from kd.registry import card as model_card
from kd.registry import embed
from kd.registry import loader as serving
from kd.registry.embed import EMBED
from kd.registry.store import SHA_TAG, explain, registry_client
from kd.storage import join, put, sha256_file
from kd.train.figures import write_curves
from kd.train.lineage import git_commit, teacher_sha

CHALLENGER, CHAMPION = "challenger", "champion"
LINEAGE_KEYS = ("kd.teacher_uri", "kd.teacher_sha256", "kd.data_hash", "kd.config_hash",
                "kd.git_commit", "kd.kdflow_version", "kd.source_run_id", SHA_TAG)
SHIPPED = ("errors.py", "plugins.py")  # beside the loader; the families follow in models/
RECORD = "registration.json"


def stage_code(dest: Path) -> Path:
    """Copy what a registered model's loader needs to ``dest/kdflow_model_loader``:
    `kd.registry.loader` as its ``__init__.py``, `kd.errors`, `kd.plugins` and the model
    families (torch only; they import each other relatively). Nothing named ``kd`` is
    shipped, so the model's ``code/`` cannot shadow an installed kdflow."""
    src = Path(kd.__file__).parent
    pkg = dest / serving.LOADER_MODULE
    (pkg / "models").mkdir(parents=True)
    shutil.copy2(src / "registry" / "loader.py", pkg / "__init__.py")
    for name in SHIPPED:
        shutil.copy2(src / name, pkg / name)
    for f in (src / "models").glob("*.py"):
        if f.name != "weights.py":  # weights.py needs safetensors + storage; the loader does not
            shutil.copy2(f, pkg / "models" / f.name)
    return pkg


def arch_config(meta: dict[str, str], sha: str) -> dict[str, Any]:
    """The ``kd_model.json`` of a weights file's safetensors metadata; an embed model's
    also holds ``task`` and ``text`` (`kd.registry.embed.text_config`)."""
    cfg = {"model": meta["kd.model"], "args": json.loads(meta.get("kd.args", "{}")),
            "width": float(meta.get("kd.width", 1.0)), "num_classes": int(meta["kd.num_classes"]),
            "input_shape": json.loads(meta["kd.input_shape"]),
            "input_dtype": meta.get("kd.input_dtype", "float32"), "weights_sha256": sha,
            "class_names": json.loads(meta.get("kd.class_names", "[]"))}
    if meta.get("kd.task", "classify") == EMBED:
        cfg.update(task=EMBED, text=embed.text_config(meta, f"weights of {meta.get('kd.run_id', 'the run')}"))
    return cfg


def _save_flavors(path: str, mlflow_model: Any, data_dir: str, code_dir: str, card: str,
                  plots_dir: str, signature: Any, input_example: Any, extra_reqs: list[str],
                  program: Any, **_: Any) -> None:
    """Flavor ``save_model`` for `mlflow.models.Model.log`: the pyfunc flavor, and the
    pytorch flavor when `export_program` gave a ``program``."""
    import mlflow
    import torch

    reqs = [f"mlflow>={mlflow.__version__.rsplit('.', 1)[0]}",
            f"torch>={'.'.join(torch.__version__.split('+')[0].split('.')[:2])}", "numpy",
            *extra_reqs]
    mlflow.pyfunc.save_model(path, loader_module=serving.LOADER_MODULE, data_path=data_dir,
                             code_paths=[code_dir], mlflow_model=mlflow_model, signature=signature,
                             input_example=input_example, pip_requirements=reqs,
                             model_config={"precision": "fp32"})  # overridable when loading
    Path(path, "model_card.md").write_text(card)
    if Path(plots_dir).is_dir():
        shutil.copytree(plots_dir, Path(path, "plots"))
    if program is not None:  # the pt2 program is only for mlflow.pytorch.load_model (docs/registry.md)
        Path(path, "pt2").mkdir()
        torch.export.save(program, str(Path(path, "pt2", "model.pt2")))
        mlflow_model.add_flavor("pytorch", model_data="pt2", pytorch_version=str(torch.__version__),
                                code=None)
    mlflow_model.save(str(Path(path, "MLmodel")))


def export_program(module: Any, example: np.ndarray, text: bool) -> tuple[Any, str]:
    """``(torch.export program of module(example), "")`` with a dynamic batch dimension
    (and sequence dimension for token ids of a text model), or ``(None, why)`` when
    torch.export cannot trace the architecture: the version is then registered without
    the pytorch flavor (pyfunc still works) and the card and log say so."""
    import torch
    from torch.export import Dim

    dims = {0: Dim.AUTO, 1: Dim.AUTO} if text else {0: Dim.AUTO}
    try:
        return torch.export.export(module, (torch.as_tensor(example),), dynamic_shapes=(dims,)), ""
    except Exception as e:  # an architecture torch.export cannot trace
        first = (str(e).strip().splitlines() or [""])[0][:300]
        why = f"no pytorch flavor (torch.export failed: {type(e).__name__}: {first})"
        print(f"[kd] {why}", flush=True)
        return None, why


_FLAVOR = SimpleNamespace(__name__="kdflow", save_model=_save_flavors)


def run_config(c: Any, run_id: str) -> Experiment:
    """The resolved config logged with run ``run_id``."""
    d = tempfile.mkdtemp(prefix="kd-run-")
    try:
        path = c.download_artifacts(run_id, "config.yaml", d)
    except Exception as e:
        raise explain(e, f"run {run_id}: config.yaml") from None
    return load_experiment(path)


def teacher_and_holdout(exp: Experiment) -> tuple[Any, Any, None]:
    """The frozen primary teacher (None without weights) and the streamed holdout split
    of ``exp`` (`kd.train.evaluate.evaluate` scores it block by block; no labels array)."""
    from kd.train.assemble import primary_teacher
    from kd.train.text import run_splits

    splits = run_splits(exp)
    return primary_teacher(exp, splits), splits.holdout, None


def register_run(run_id: str, model_name: str | None = None,
                 exp: Experiment | None = None) -> tuple[str, str]:
    """Register run ``run_id``'s student weights under ``model_name`` (default the config's
    ``registry.model_name``), tag lineage, alias it ``challenger``; returns (name, version)."""
    c = registry_client()
    try:
        run = c.get_run(run_id)
    except Exception as e:
        raise explain(e, f"run {run_id}") from None
    exp = exp or run_config(c, run_id)
    name = model_name or exp.registry.model_name
    if not name:
        raise InputError("registry.model_name: not set; set it in the config or pass --name")
    work = Path(tempfile.mkdtemp(prefix="kd-register-"))
    local, sha, meta = _verified_weights(c, run_id, run.data.tags, work)
    data, cfg, module = _stage_data(work, local, meta, sha)
    student_m, teacher_m, flavor = _holdout_and_inputs(c, run_id, sha, exp, cfg, module, data)
    program, why = export_program(module, flavor.pop("export_example"), cfg.get("task") == EMBED)
    lineage = _lineage(exp, run.data.tags, meta, run_id, sha)
    recipe = exp.model_dump(mode="json", include={"student", "teacher", "distill", "optim",
                                                  "trainer", "data"})
    card = model_card.render(name, student_m, teacher_m, recipe, lineage,
                             write_curves(c, run_id, work / "plots"),
                             task=cfg.get("task", "classify"), notes=[why] if why else [])
    from mlflow.models import Model

    try:
        info = Model.log(None, _FLAVOR, name="model", run_id=run_id, registered_model_name=name,
                         await_registration_for=60, data_dir=str(data),
                         code_dir=str(stage_code(work / "code")), card=card,
                         plots_dir=str(work / "plots"), program=program, **flavor,
                         metadata={SHA_TAG: sha})
    except InputError:
        raise
    except Exception as e:
        raise explain(e, f"register run {run_id} as {name!r}") from None
    version = str(info.registered_model_version)
    _tag_version(c, name, version, {**lineage, "kd.model_card": "model_card.md",
                                    "kd.task": cfg.get("task", "classify"),
                                    "kd.holdout": json.dumps(student_m, sort_keys=True)}, card)
    key = "cosine" if cfg.get("task") == EMBED else "accuracy"
    print(f"[kd] registered {name} version {version} (alias {CHALLENGER}); "
          f"holdout {key} {student_m.get(key, float('nan')):.4f}", flush=True)
    return name, version


def _holdout_and_inputs(c: Any, run_id: str, sha: str, exp: Experiment, cfg: dict[str, Any],
                        module: Any, data: Path) -> tuple[dict[str, float], dict[str, float] | None,
                                                          dict[str, Any]]:
    """(student, teacher) holdout metrics and the flavor inputs (signature, input example,
    extra requirements, export example). A classifier is scored here on the config's
    holdout split; an embed model's metrics are the ones its run logged
    (`kd.registry.embed.logged_holdout`), its input is text."""
    if cfg.get("task") == EMBED:
        student_m, teacher_m = embed.logged_holdout(c, run_id, sha)
        return student_m, teacher_m or None, {
            "signature": embed.signature(int(cfg["num_classes"])),
            "input_example": embed.input_example(), "extra_reqs": embed.requirements(cfg["model"]),
            "export_example": embed.example_ids(data, cfg["text"])}
    from kd.train.evaluate import evaluate

    teacher, hx, hy = teacher_and_holdout(exp)
    student_m = evaluate(module, hx, hy, teacher)
    teacher_m = evaluate(teacher, hx, hy) if teacher is not None else None
    hx4 = hx.sample(4).x  # a bounded sample of the streamed holdout
    example = np.asarray(hx4).astype(np.int64 if np.issubdtype(hx4.dtype, np.integer) else np.float32)
    return student_m, teacher_m, classify_inputs(example, int(cfg["num_classes"]))


def classify_inputs(example: np.ndarray, num_classes: int) -> dict[str, Any]:
    """The flavor inputs of a classifier: signature (flat feature rows in, float32
    ``[-1, num_classes]`` out), the flattened input example, no extra requirements, and
    ``example`` in its native shape for torch.export."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    flat = example.reshape(len(example), -1)  # pyfunc takes rows of features (DataFrame-friendly)
    sig = ModelSignature(Schema([TensorSpec(flat.dtype, (-1, flat.shape[1]))]),
                         Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes))]))
    return {"signature": sig, "input_example": flat, "extra_reqs": [], "export_example": example}


def _verified_weights(c: Any, run_id: str, tags: dict[str, str],
                      work: Path) -> tuple[str, str, dict[str, str]]:
    """(local weights file, its sha256, its metadata) of a finished run, checked against
    the run's sha256 tag."""
    want = tags.get(SHA_TAG)
    if not want:
        raise InputError(f"run {run_id}: has no {SHA_TAG} tag (not a finished kdflow run)")
    try:
        local = c.download_artifacts(run_id, f"weights/{WEIGHTS_FILE}", str(work))
    except Exception as e:
        raise explain(e, f"run {run_id}: weights/{WEIGHTS_FILE}") from None
    sha = sha256_file(local)
    if sha != want:
        raise InputError(f"run {run_id}: weights checksum mismatch ({sha[:16]}... != "
                         f"{want[:16]}... recorded); refusing to register")
    from kd.models.weights import read_metadata

    meta = read_metadata(local)
    if "kd.model" not in meta:
        raise InputError(f"run {run_id}: weights carry no kd.model metadata")
    return local, sha, meta


def _stage_data(work: Path, local: str, meta: dict[str, str], sha: str) -> tuple[Path, dict[str, Any], Any]:
    """``work/student`` with the weights and ``kd_model.json``; its config and the module
    rebuilt from it by the loader (so a model that will not load is never registered)."""
    data = work / "student"
    data.mkdir()
    shutil.copy2(local, data / serving.WEIGHTS)
    cfg = arch_config(meta, sha)
    if cfg.get("task") == EMBED:
        cfg["text"] = embed.stage_tokenizer(data, cfg["text"])
    (data / serving.CONFIG).write_text(json.dumps(cfg, indent=1))
    module, _ = serving.build_module(data)
    return data, cfg, module


def _lineage(exp: Experiment, tags: dict[str, str], meta: dict[str, str], run_id: str,
             sha: str) -> dict[str, str]:
    """The `LINEAGE_KEYS` tags of a new version."""
    return {"kd.teacher_uri": tags.get("kd.teacher_uri", ""),
            "kd.teacher_sha256": tags.get("kd.teacher_sha256") or teacher_sha(exp),
            "kd.data_hash": meta.get("kd.data_hash", tags.get("kd.data_hash", "")),
            "kd.config_hash": meta.get("kd.config_hash", tags.get("kd.config_hash", "")),
            "kd.git_commit": tags.get("kd.git_commit") or git_commit(),
            "kd.kdflow_version": tags.get("kd.kdflow_version") or kd.__version__,
            "kd.source_run_id": run_id, SHA_TAG: sha}


def _tag_version(c: Any, name: str, version: str, tags: dict[str, str], card: str) -> None:
    """Tags, description (the card) and the ``challenger`` alias of a new version."""
    try:
        for k, v in tags.items():
            c.set_model_version_tag(name, version, k, v)
        c.update_model_version(name, version, description=card[:5000])
        c.set_registered_model_alias(name, CHALLENGER, version)
    except Exception as e:
        raise explain(e, f"tag {name} version {version}") from None


def write_record(doc: dict[str, Any], uri: str, endpoint: str | None = None,
                 sse_args: dict[str, str] | None = None) -> None:
    """Write the registration record ``doc`` as JSON to ``uri`` through `kd.storage`:
    an S3 object for s3:// (never a local folder named ``s3:``, encrypted as
    ``sse_args`` say), an atomic rename on disk."""
    with tempfile.TemporaryDirectory(prefix="kd-record-") as d:
        tmp = Path(d) / RECORD
        tmp.write_text(json.dumps(doc, indent=1))
        put(tmp, uri, endpoint, sse_args)


def register_outcome(run_id: str, weights_uri: str, weights_sha256: str, exp: Experiment,
                     record_dir: str | Path) -> tuple[str, str]:
    """`register_run` after `kd distill --register`; first writes a record of the run
    (``record_dir/registration.json``, local or s3://, see `write_record`) so nothing is
    lost when the server is unreachable: ``kd register RUN_ID`` retries from it."""
    record = join(str(record_dir), RECORD)
    endpoint = exp.storage.endpoint_url
    doc = {"run_id": run_id, "weights": weights_uri, "weights_sha256": weights_sha256,
           "model_name": exp.registry.model_name, "status": "pending", "at": time.time()}
    try:
        write_record(doc, record, endpoint, sse.of(exp.storage))
    except InputError as e:
        raise InputError(f"{e} (writing the registration record; run {run_id} is not "
                         f"registered: retry with: kd register {run_id})") from None
    try:
        name, version = register_run(run_id, exp.registry.model_name, exp)
    except InputError as e:
        raise InputError(f"{e} (run recorded in {record}; retry with: "
                         f"kd register {run_id})") from None
    doc.update(status="registered", version=version)
    write_record(doc, record, endpoint, sse.of(exp.storage))
    return name, version
