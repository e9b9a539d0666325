"""scripts/build_text_corpus.py on a small package folder written here: what it keeps,
what it drops, how it splits, and that it is deterministic."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("build_text_corpus", ROOT / "scripts" / "build_text_corpus.py")
corpus = importlib.util.module_from_spec(spec)
spec.loader.exec_module(corpus)

MODULE = '''"""Tools that count the apples in a basket.

The counting is done one apple at a time. Rotten apples are counted twice by mistake.
See https://example.org/apples for the whole story of the basket.
"""


def count(basket, strict=False):
    """Count the apples in the given basket quickly.

    Args:
        basket (list): The basket whose apples are counted one by one.
        strict: Whether a pear in the basket raises an error at once.

    Returns:
        int: The number of apples that were found in the basket.

    >>> count(["apple", "apple"])
    2

    Example::

        for apple in basket:
            total = total + 1
    """


class Basket:
    """A basket holds a number of apples and pears.

    Parameters
    ----------
    size : int
        The number of fruits that fit in this basket.
    """

    def weigh(self):
        """The counting is done one apple at a time."""
'''

README = """# The apple package

This package counts **apples** in a `Basket` with [great care](https://example.org).

```python
from apples import count
print(count(["apple", "apple", "apple"]))
```

| column | meaning of the column |
|---|---|
| a | an apple in the basket |

- A bullet point says that pears are never counted.
- x = 1; y = foo(bar, baz); z = {"a": 1, "b": 2}
Les pommes sont très bonnes à manger avec du fromage été à ça où.
"""


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    pkg = tmp_path / "site" / "apples"
    pkg.mkdir(parents=True)
    (pkg / "core.py").write_text(MODULE)
    (pkg / "README.md").write_text(README)
    (pkg / "broken.py").write_text("def oops(:\n")  # does not parse: skipped
    return tmp_path / "site"


def build(root: Path, out: Path, *extra: str) -> dict[str, list[str]]:
    assert corpus.main([str(out), "--root", str(root), "--min-sentences", "1", *extra]) == 0
    return {name: (out / f"{name}.jsonl").read_text().splitlines() for name in ("train", "holdout", "retrieval")}


def test_keeps_prose_and_drops_code_markup_and_duplicates(root: Path, tmp_path: Path) -> None:
    got = build(root, tmp_path / "out", "--holdout", "0.5")
    texts = sorted(json.loads(line)["text"] for line in got["train"] + got["holdout"])
    assert texts == sorted([
        "Tools that count the apples in a basket.",
        "The counting is done one apple at a time.",  # once, though two docstrings say it
        "Rotten apples are counted twice by mistake.",
        "See for the whole story of the basket.",  # the URL removed
        "Count the apples in the given basket quickly.",
        "The basket whose apples are counted one by one.",  # the Google "name (type):" stripped
        "Whether a pear in the basket raises an error at once.",
        "The number of apples that were found in the basket.",
        "A basket holds a number of apples and pears.",
        "The number of fruits that fit in this basket.",  # numpydoc "size : int" line dropped
        "This package counts apples in a Basket with great care.",  # markdown stripped
        "A bullet point says that pears are never counted.",
    ])
    meta = json.loads((tmp_path / "out" / "corpus.json").read_text())
    assert meta["counts"]["sentences_dedup"] == 12 and meta["counts"]["py_files"] == 2
    assert meta["packages"] == {"apples": 12}


def test_split_by_source_and_deterministic(root: Path, tmp_path: Path) -> None:
    a = build(root, tmp_path / "a", "--holdout", "0.5", "--seed", "3")
    b = build(root, tmp_path / "b", "--holdout", "0.5", "--seed", "3")
    assert a == b
    for seed in range(8):  # the three sentences of count()'s docstring stay together
        got = build(root, tmp_path / f"s{seed}", "--holdout", "0.5", "--seed", str(seed))
        sides = {"train" if any("given basket quickly" in line for line in got["train"]) else "holdout"}
        sides |= {"train" if any("raises an error at once" in line for line in got["train"]) else "holdout"}
        assert len(sides) == 1


def test_retrieval_pairs_come_from_held_out_docstrings(root: Path, tmp_path: Path) -> None:
    # find a seed that holds out count()'s docstring (4 sentences) and one that keeps it in train
    seen = set()
    for seed in range(40):
        got = build(root, tmp_path / f"r{seed}", "--holdout", "0.5", "--seed", str(seed))
        held = corpus.in_holdout("apples/core.py::count", seed, 0.5)
        pairs = [json.loads(line) for line in got["retrieval"]]
        queries = {p["query"] for p in pairs}
        assert ("Count the apples in the given basket quickly." in queries) == held
        for p in pairs:
            assert json.dumps({"text": p["query"]}) in got["holdout"]
        seen.add(held)
        if seen == {True, False}:
            break
    assert seen == {True, False}


def test_too_few_sentences_is_one_line(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert corpus.main([str(tmp_path / "x"), "--root", str(root), "--min-sentences", "1000"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "only 12 deduplicated sentences" in err and "1000" in err
    assert not (tmp_path / "x").exists()
