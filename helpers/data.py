"""AG News loading, the class-balanced split, class weights and tokenization.

Taught in notebook 01 (data and balancing) and notebook 02 (class weights); used by notebooks 05-07,
``helpers.train`` and ``helpers.predict``.
"""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from helpers.config import AG_NEWS_LABELS, CourseConfig
from helpers.io import REPO_ROOT, hub_reachable

DATA_DIR = REPO_ROOT / "data"
AG_NEWS_CSV = DATA_DIR / "ag_news" / "ag_news_sample.csv"
HUB_DATASET = "fancyzhx/ag_news"


class DataError(ValueError):
    """Bad input data; the message names the problem and the fix."""


def make_text(title: str, description: str) -> str:
    """One example's text: title and description (the original escapes line breaks as ``\\``)."""
    return f"{title.strip()}. {description.replace(chr(92), ' ').strip()}"


def _looks_like_ag_news(first_row: list[str]) -> bool:
    return len(first_row) == 3 and first_row[0].strip().lstrip("-").isdigit()


def _decode(path: Path) -> str:
    """The file's text: UTF-8, with or without a byte-order mark (spreadsheets write one); any
    other encoding is a DataError that says how to convert it."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror}. Check its permissions.") from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(
            f"{path} is UTF-16 (as Excel's 'Unicode Text' saves it). Save it as 'CSV UTF-8', or "
            f"convert it: iconv -f UTF-16 -t UTF-8 {path.name} > {path.stem}.utf8.csv"
        )
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DataError(
            f"{path} is not UTF-8 (byte 0x{raw[error.start]:02x} on line {line}; Latin-1 or "
            f"Windows-1252 likely). Convert it: iconv -f WINDOWS-1252 -t UTF-8 {path.name} > "
            f"{path.stem}.utf8.csv"
        ) from None
    if "\x00" in text:
        raise DataError(f"{path} holds NUL bytes: it is not a text CSV. Save it as 'CSV UTF-8'.")
    return text


def _rows(path: Path, text: str) -> list[list[str]]:
    """Every row of the CSV, strictly: an unterminated quote is an error, not a merged row."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        return [row for row in reader if row]  # blank lines carry nothing
    except csv.Error as error:
        raise DataError(
            f"{path}, line {reader.line_num}: {error}. Check the quotes on that line (a text "
            'field with a quote inside is written "like ""this"""). '
        ) from None


def read_text_csv(
    path: str | Path,
    labels: Sequence[str] = AG_NEWS_LABELS,
    require_labels: bool = False,
    keep_columns: bool = False,
) -> pd.DataFrame:
    """Read a CSV into columns ``text`` (and ``label``, 0-based, when present).

    Two layouts are accepted: the original AG News one (no header; class index 1..K, title,
    description) and one with a header holding a ``text`` column and optionally ``label`` (an
    integer 0..K-1 or a label name). The file must be UTF-8 (a byte-order mark is fine), every row
    must have as many fields as the first (an unquoted comma inside a text would otherwise cut it),
    and column names must be unique. ``keep_columns``: keep a header file's other columns (``id``,
    ``source``, ...) after ``text`` and ``label``, as ``helpers.predict`` writes them back out.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"Data file {path} does not exist. Check the path, or run from the repository root."
        )
    if path.stat().st_size == 0:
        raise DataError(
            f"Data file {path} is empty. Give a CSV with a `text` column or in the AG News layout."
        )
    rows = _rows(path, _decode(path))
    if not rows:
        raise DataError(f"Data file {path} has no rows. Add examples to it.")
    ag_news = _looks_like_ag_news(rows[0])
    header = ["label", "title", "description"] if ag_news else [c.strip() for c in rows[0]]
    body = rows if ag_news else rows[1:]
    for number, row in enumerate(body, start=1 if ag_news else 2):
        if len(row) != len(header):
            layout = (
                "3 (class index, title, description)"
                if ag_news
                else f"{len(header)}, as the header"
            )
            raise DataError(
                f"{path}, row {number}: {len(row)} fields where the file has {layout}. Put a text "
                'that contains commas in double quotes: "Stocks rally, oil falls".'
            )
    if not ag_news:
        repeated = sorted({c for c in header if header.count(c) > 1})
        if repeated:
            raise DataError(
                f"{path}: the header names {repeated} more than once. Rename or remove the "
                "repeated columns."
            )
        if "text" not in header:
            raise DataError(
                f"{path} has neither the AG News layout (class index, title, description; no "
                f"header) nor a `text` column (its columns are {header}). Rename the column "
                "holding the text to `text`."
            )
    raw = pd.DataFrame(body, columns=header, dtype=str)
    if ag_news:
        df = pd.DataFrame(
            {
                "text": [
                    make_text(t, d) for t, d in zip(raw["title"], raw["description"], strict=True)
                ]
            }
        )
        df["label"] = _parse_labels(raw["label"], labels, path, one_based=True)
    else:
        df = pd.DataFrame({"text": raw["text"].astype(str)})
        if "label" in raw.columns:
            df["label"] = _parse_labels(raw["label"], labels, path, one_based=False)
        if keep_columns:
            for column in header:
                if column not in ("text", "label"):
                    df[column] = raw[column]
    if df.empty:
        raise DataError(f"Data file {path} has a header but no rows. Add examples to it.")
    if "label" in df.columns:
        _warn_if_shifted(raw["label"], labels, path, one_based=ag_news)
    if require_labels and "label" not in df.columns:
        raise DataError(f"{path} has no labels. Add a `label` column, or use the AG News layout.")
    return df


def _warn_if_shifted(column: pd.Series, labels: Sequence[str], path: Path, one_based: bool) -> None:
    """One line on stderr when integer labels never use the class index that tells 0-based from
    1-based counting (1-based AG News never says K, 0-based never says 0): likely read shifted."""
    values = {v.strip() for v in column}
    if len(column) < 2 * len(labels) or not all(v.isdigit() for v in values):
        return
    missing = str(len(labels)) if one_based else "0"
    if missing in values:
        return
    counts, other = ("1", "0") if one_based else ("0", "1")
    fix = (
        f"in the AG News layout (no header) write 1..{len(labels)}"
        if one_based
        else f"with a header, write 0..{len(labels) - 1} or the label names"
    )
    print(
        f"warning: {path}'s labels never use {missing}, so they are read as counting from "
        f"{counts}. If they count from {other}, the accuracy will be wrong: {fix}.",
        file=sys.stderr,
    )


def _parse_labels(
    column: pd.Series, labels: Sequence[str], path: Path, one_based: bool
) -> pd.Series:
    names = {name: i for i, name in enumerate(labels)}
    values: list[int] = []
    for row, raw in enumerate(column, start=1):
        value = raw.strip()
        if value in names:
            values.append(names[value])
            continue
        try:
            index = int(value) - (1 if one_based else 0)
        except ValueError:
            raise DataError(
                f"{path}, row {row}: label {raw!r} is neither an integer nor one of "
                f"{list(labels)}. Fix that row."
            ) from None
        if not 0 <= index < len(labels):
            span = f"1..{len(labels)}" if one_based else f"0..{len(labels) - 1}"
            raise DataError(
                f"{path}, row {row}: label {raw!r} is outside the label set ({span}, i.e. "
                f"{list(labels)}). Fix that row."
            )
        values.append(index)
    return pd.Series(values, dtype="int64")


def load_ag_news(source: str = "local", path: str | Path = AG_NEWS_CSV) -> pd.DataFrame:
    """AG News as a DataFrame with ``text`` and ``label`` (0..3).

    ``source="hub"`` loads the Hub's ``fancyzhx/ag_news`` train split (120,000 rows) and falls back
    to the bundled 6,000 rows when the Hub cannot be reached; ``"local"`` reads the bundled file.
    """
    if source == "hub":
        try:
            from datasets import load_dataset

            if not hub_reachable():
                raise ConnectionError("the Hub cannot be reached")
            hub = load_dataset(HUB_DATASET, split="train")
            return pd.DataFrame(
                {"text": hub["text"], "label": np.asarray(hub["label"], dtype="int64")}
            )
        except Exception as error:  # no network, no datasets cache: use the bundled copy
            print(
                f"Could not load {HUB_DATASET} from the Hub ({type(error).__name__}: no network "
                f"or no Hub access); using the bundled {path}."
            )
            bundled = read_text_csv(path, require_labels=True)
            bundled.attrs["instead_of_hub"] = True  # course_splits names the cause of a short split
            return bundled
    elif source != "local":
        raise ValueError(f"Unknown data source {source!r}. Use 'local' or 'hub'.")
    return read_text_csv(path, require_labels=True)


def balanced_split(
    df: pd.DataFrame,
    train_per_class: int,
    val_per_class: int,
    test_per_class: int,
    seed: int = 42,
    num_labels: int | None = None,
) -> dict[str, pd.DataFrame]:
    """A seeded, class-balanced, disjoint train/val/test split with the given per-class counts.

    Duplicate texts are dropped first so that no text lands in two splits.
    """
    for column in ("text", "label"):
        if column not in df.columns:
            raise DataError(
                f"The data has no `{column}` column (columns: {list(df.columns)}). Load it with "
                "load_ag_news."
            )
    num_labels = num_labels or int(df["label"].max()) + 1
    unique = df.drop_duplicates(subset="text").reset_index(drop=True)
    wanted = train_per_class + val_per_class + test_per_class
    parts: dict[str, list[pd.DataFrame]] = {"train": [], "val": [], "test": []}
    for label in range(num_labels):
        rows = unique[unique["label"] == label]
        if len(rows) < wanted:
            raise DataError(
                f"Class {label} has {len(rows)} unique examples but the split asks for {wanted} "
                f"({train_per_class} train + {val_per_class} val + {test_per_class} test). Lower "
                "the per-class counts."
            )
        rows = rows.sample(n=wanted, random_state=seed + label)
        parts["train"].append(rows.iloc[:train_per_class])
        parts["val"].append(rows.iloc[train_per_class : train_per_class + val_per_class])
        parts["test"].append(rows.iloc[train_per_class + val_per_class :])
    return {
        name: pd.concat(chunks).sample(frac=1.0, random_state=seed).reset_index(drop=True)
        for name, chunks in parts.items()
    }


def course_splits(config: CourseConfig) -> dict[str, pd.DataFrame]:
    """The course's split for a config: its data source, per-class counts and seed (taught in
    notebook 01, which checks that it is balanced, disjoint and reproducible)."""
    news = load_ag_news(config.data_source)
    try:
        return balanced_split(
            news,
            config.train_per_class,
            config.val_per_class,
            config.test_per_class,
            seed=config.seed,
            num_labels=config.num_labels,
        )
    except DataError as error:
        if not news.attrs.get("instead_of_hub"):
            raise
        raise DataError(
            f"{HUB_DATASET} could not be loaded (no network or no Hub access), and the bundled "
            f"{len(news):,} rows are too few for this split: {error} Or connect to the Hub."
        ) from None


def imbalanced_subset(df: pd.DataFrame, per_class: Sequence[int], seed: int = 42) -> pd.DataFrame:
    """Keep ``per_class[c]`` rows of class ``c`` (for teaching what class weights do)."""
    chunks = []
    for label, count in enumerate(per_class):
        rows = df[df["label"] == label]
        if count > len(rows):
            raise DataError(
                f"Class {label} has {len(rows)} rows; cannot keep {count}. Lower its count."
            )
        chunks.append(rows.sample(n=count, random_state=seed + label))
    return pd.concat(chunks).sample(frac=1.0, random_state=seed).reset_index(drop=True)


def class_weights(labels: Sequence[int] | np.ndarray, num_labels: int) -> torch.Tensor:
    """Normalised inverse-frequency weights: w_c proportional to 1/n_c, with mean 1 (all ones when
    balanced)."""
    counts = np.bincount(np.asarray(labels, dtype="int64"), minlength=num_labels)[:num_labels]
    empty = [c for c in range(num_labels) if counts[c] == 0]
    if empty:
        raise DataError(
            f"Class(es) {empty} have no training examples, so their weight would divide by zero. "
            "Add examples of every class to the training set."
        )
    inverse = 1.0 / counts
    return torch.tensor(inverse / inverse.mean(), dtype=torch.float32)


def tokenize(df: pd.DataFrame, tokenizer: Any, max_length: int, by_length: bool = False) -> "Any":
    """A ``datasets.Dataset`` with input_ids, attention_mask (unpadded, truncated) and labels when
    present.

    ``by_length``: rows sorted by token count, so that an evaluation's batches (taken in order)
    pad little; training batches are grouped by length by the Trainer's sampler instead."""
    from datasets import Dataset

    columns = ["text"] + (["label"] if "label" in df.columns else [])
    dataset = Dataset.from_pandas(df[columns].reset_index(drop=True), preserve_index=False)

    def encode(batch: dict[str, list]) -> dict[str, list]:
        return tokenizer(batch["text"], truncation=True, max_length=max_length)

    dataset = dataset.map(encode, batched=True, remove_columns=["text"])
    if "label" in columns:
        dataset = dataset.rename_column("label", "labels")
    if by_length:
        order = np.argsort([len(ids) for ids in dataset["input_ids"]], kind="stable")
        dataset = dataset.select(order)
    return dataset


def token_lengths(texts: Sequence[str], tokenizer: Any) -> np.ndarray:
    """Number of tokens of each text, without truncation."""
    return np.array([len(ids) for ids in tokenizer(list(texts))["input_ids"]])


def token_length_stats(texts: Sequence[str], tokenizer: Any) -> dict[str, float]:
    """Mean, median, 95th and 99th percentile and maximum length in tokens."""
    lengths = token_lengths(texts, tokenizer)
    return {
        "mean": float(lengths.mean()),
        "median": float(np.median(lengths)),
        "p95": float(np.percentile(lengths, 95)),
        "p99": float(np.percentile(lengths, 99)),
        "max": float(lengths.max()),
    }
