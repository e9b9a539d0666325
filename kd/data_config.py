"""The `data:` section of an experiment: where the data comes from, its split, and how
text is tokenized. Split from config.py to keep each module small; `kd.config`
re-exports every name here."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from kd.names import SEED_MAX
from kd.sections import Strict


class SplitConfig(Strict):
    """Fractions of the data for train / val / holdout, split once with a fixed seed."""

    train: float = Field(0.6, gt=0, lt=1)
    val: float = Field(0.2, gt=0, lt=1)
    holdout: float = Field(0.2, ge=0, lt=1)
    stratify: bool = Field(False, description="removed: the split hashes each row's key "
                           "(docs/data.md); only false is accepted")
    seed: int = Field(0, ge=0, le=SEED_MAX)

    @field_validator("stratify")
    @classmethod
    def _no_stratify(cls, v: bool) -> bool:
        if v:
            raise ValueError("stratification was removed: the split hashes each row's key "
                             "against the fractions, with no pass over the data (docs/data.md); "
                             "drop stratify")
        return v

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitConfig:
        total = self.train + self.val + self.holdout
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + holdout must be 1.0, got {total:g}")
        return self


class TextConfig(Strict):
    """Text data: which column holds the text, how it becomes token ids (docs/text.md).

    Rows are tokenized inside the Ray Data read tasks into int64 ids ``[max_length]``
    padded with the tokenizer's pad id; teacher and student read the same ids."""

    column: str = Field("text", min_length=1, description="the text column (jsonl key, "
                        "parquet/csv column); a .txt file is one text per line")
    tokenizer: str | None = Field(None, description="a model directory or installed package "
                                  "with tokenizer.json; default: the teacher's args.path")
    max_length: int = Field(128, ge=2, le=8192, description="tokens per text, special "
                            "tokens included")
    truncation: Literal["warn", "error"] = Field("warn", description="a longer text: warn "
                                                 "(cut it, count and report), error (stop, "
                                                 "naming the file and row)")
    retrieval: str | None = Field(None, description="a jsonl of {query, doc} pairs scored at "
                                  "holdout: recall@1/@10 of the student and the teacher")


class DataConfig(Strict):
    """Where the data comes from: a builtin name, or a path / s3:// URI to files."""

    source: str = "digits"
    format: Literal["auto", "parquet", "npz", "csv", "imagefolder", "jsonl", "txt"] = "auto"
    args: dict[str, Any] = Field(default_factory=dict)
    x_column: str = "x"
    y_column: str = "y"
    key_column: str | None = Field(None, description="a column (array in npz) of unique row "
                                   "ids: the row key; default: file path + row number")
    split: SplitConfig = Field(default_factory=SplitConfig)
    transforms: list[str] = Field(default_factory=list, description="training-time random "
                                  "augmentations: random_flip, random_crop, gaussian_noise")
    labels: Literal["all", "none"] = Field("all", description="all: labels as given (nulls are "
                                           "unlabeled); none: drop the train split's labels")
    labeled_fraction: float | None = Field(None, gt=0, le=1)
    transfer: str | None = None
    balance_by_teacher: bool = False
    class_names: list[str] | None = Field(None, description="the name of each class, in label "
                                          "order; image folders give their class directories")
    text: TextConfig | None = Field(None, description="read the data as text and tokenize it")

    @field_validator("class_names")
    @classmethod
    def _names(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or any(not str(n).strip() for n in v) or len(set(v)) < len(v)):
            raise ValueError("class names must be non-empty and unique")
        return v

    @field_validator("labels", mode="before")
    @classmethod
    def _no_partial(cls, v: Any) -> Any:
        if v == "partial":
            raise ValueError("'partial' was removed (it did the same as 'all'); use 'all' (nulls "
                             "in the label column are unlabeled) or data.labeled_fraction")
        return v
