"""Classify a CSV with a trained model.

    python -m helpers.predict --model DIR --input FILE [--output FILE.csv]

DIR is a run's ``merged/`` folder (fastest) or its ``adapter/`` folder, of a classification head or
of an instruction-tuned model (``--task instruct``; it is scored by each label's log-likelihood, so
every row gets a valid label). FILE is a CSV in the original AG News layout (no header; class index
1-4, title, description) or with a header and a ``text`` column (optionally ``label``). Writes one
row per input with ``predicted_label`` and a probability per class, and prints the accuracy when
labels are present; a header file's other columns are kept. Rows go out in chunks with a progress
bar, and Ctrl-C keeps those written (``<output>.partial.csv``). Taught in notebook 07.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from helpers.data import DataError, read_text_csv
from helpers.evaluation import classification_metrics, softmax
from helpers.merging import (
    load_for_inference,
    model_outputs,
    read_labels,
    saved_config,
    servable_folder,
)
from helpers.modeling import ModelError

CHUNK_ROWS = 256  # rows predicted, then written, at a time


class Interrupted(Exception):
    """Ctrl-C during predicting; the message says which rows were kept, and where."""


def _partial_path(output_csv: Path) -> Path:
    return output_csv.with_name(f"{output_csv.stem}.partial{output_csv.suffix or '.csv'}")


def check_output(input_csv: str | Path, output_csv: str | Path) -> Path:
    """The output path, checked before any work: not the input, not a folder, writable."""
    output = Path(output_csv)
    if output.exists() and output.resolve() == Path(input_csv).resolve():
        raise DataError(
            f"--output {output} is the input file, which it would replace. Name another."
        )
    if output.is_dir():
        raise DataError(
            f"--output {output} is a folder. Name a CSV file, such as {output}/out.csv."
        )
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output.parent, prefix=f".{output.name}."):
            pass
    except OSError as error:
        raise DataError(
            f"cannot write {output}: {error.strerror}. Choose a folder you can write to."
        ) from None
    return output


def predict_file(
    model_dir: str | Path,
    input_csv: str | Path,
    output_csv: str | Path,
    batch_size: int = 16,
    dtype: str = "auto",
) -> pd.DataFrame:
    """Predict every row of ``input_csv``, write ``output_csv`` and return the table.

    Rows are predicted and written ``CHUNK_ROWS`` at a time into ``<output>.partial.csv``, renamed
    to ``output_csv`` when all are done; Ctrl-C keeps the partial file and raises ``Interrupted``.
    A header file's other columns (``id``, ...) are written back beside the predictions.
    ``dtype``: "auto" (``helpers.hardware.serving_dtype``), "float32", "float16" or "bfloat16". A
    merged model that does not fit this GPU is served from the run's adapter/ (its 4-bit base).
    """
    output = check_output(input_csv, output_csv)
    model_dir = servable_folder(model_dir)
    meta = read_labels(model_dir)
    labels = meta["labels"]
    df = read_text_csv(input_csv, labels=labels, keep_columns=True)
    model, tokenizer, id2label = load_for_inference(
        model_dir, None if dtype == "auto" else getattr(torch, dtype)
    )
    print(
        f"predicting {len(df)} rows in {str(next(model.parameters()).dtype).removeprefix('torch.')}"
    )
    config = saved_config(model_dir)
    partial = _partial_path(output)
    chunks, done = [], 0
    start = time.perf_counter()
    try:
        with (
            partial.open("w", newline="", encoding="utf-8") as handle,
            tqdm(total=len(df), unit="rows", disable=None) as bar,
        ):
            for begin in range(0, len(df), CHUNK_ROWS):
                part = df.iloc[begin : begin + CHUNK_ROWS]
                # class logits, or label log-likelihoods for an instruction-tuned model: softmax
                # gives probabilities over labels
                probabilities = softmax(
                    model_outputs(model, tokenizer, part["text"].tolist(), config, batch_size)
                )
                out = part.copy()
                if "label" in out.columns:
                    out["label"] = [id2label[int(i)] for i in out["label"]]
                out["predicted_label"] = [id2label[int(i)] for i in probabilities.argmax(axis=1)]
                for index, name in id2label.items():
                    out[f"prob_{name}"] = probabilities[:, index].round(5)
                out.to_csv(handle, header=begin == 0, index=False)
                handle.flush()
                chunks.append(out)
                done += len(part)
                bar.update(len(part))
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted after {done} of {len(df)} rows; they are in {partial}. Run the command "
            "again to predict every row."
        ) from None
    os.replace(partial, output)
    seconds = time.perf_counter() - start
    table = pd.concat(chunks, ignore_index=True)
    print(
        f"predicted {len(table)} rows in {seconds:.1f} s ({len(table) / max(seconds, 1e-9):.1f} "
        f"rows/s); wrote {output}"
    )
    if "label" in df.columns:
        predicted = table["predicted_label"].map({name: i for i, name in id2label.items()})
        metrics = classification_metrics(df["label"].to_numpy(), predicted.to_numpy())
        print(
            f"accuracy {metrics['accuracy']:.4f} | balanced accuracy "
            f"{metrics['balanced_accuracy']:.4f} | macro-F1 {metrics['macro_f1']:.4f}"
        )
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m helpers.predict", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", required=True, help="a run's merged/ or adapter/ folder")
    parser.add_argument(
        "--input", required=True, help="CSV: AG News layout, or a header with a `text` column"
    )
    parser.add_argument(
        "--output",
        help="CSV to write (default: <input name>.predictions.csv in the current folder)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="rows per batch (default 16)")
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "float16", "bfloat16"],
        default="auto",
        help="auto: the GPU's compute precision (fp16 on a T4, bf16 on an A100 or newer), bf16 on "
        "CPUs with native bf16, else fp32",
    )
    args = parser.parse_args(argv)
    output = args.output or f"{Path(args.input).stem}.predictions.csv"
    try:
        predict_file(args.model, args.input, output, args.batch_size, args.dtype)
    except (DataError, ModelError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Interrupted as stopped:
        print(f"\n{stopped}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
