"""Classify a CSV with a trained model.

    python -m helpers.predict --model DIR --input FILE [--output FILE.csv]

DIR is a run's ``merged/`` folder (fastest) or its ``adapter/`` folder, of a classification head or
of an instruction-tuned model (``--task instruct``; it is scored by each label's log-likelihood, so
every row gets a valid label). FILE is a CSV in the original AG News layout (no header; class index
1-4, title, description) or with a header and a ``text`` column (optionally ``label``). Writes one
row per input with ``predicted_label`` and a probability per class, and prints the accuracy when
labels are present. Taught in notebook 07.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from helpers.data import DataError, read_text_csv
from helpers.evaluation import classification_metrics, softmax
from helpers.io import atomic_write_text
from helpers.merging import load_for_inference, model_outputs, read_labels, saved_config
from helpers.modeling import ModelError


def predict_file(
    model_dir: str | Path,
    input_csv: str | Path,
    output_csv: str | Path,
    batch_size: int = 16,
    dtype: str = "auto",
) -> pd.DataFrame:
    """Predict every row of ``input_csv``, write ``output_csv`` and return the table.

    ``dtype``: "auto" (``helpers.hardware.serving_dtype``), "float32" or "bfloat16".
    """
    meta = read_labels(model_dir)
    labels = meta["labels"]
    df = read_text_csv(input_csv, labels=labels)
    model, tokenizer, id2label = load_for_inference(
        model_dir, None if dtype == "auto" else getattr(torch, dtype)
    )
    print(
        f"predicting {len(df)} rows in {str(next(model.parameters()).dtype).removeprefix('torch.')}"
    )
    start = time.perf_counter()
    # class logits, or label log-likelihoods for an instruction-tuned model: softmax gives
    # probabilities over labels
    outputs = model_outputs(
        model, tokenizer, df["text"].tolist(), saved_config(model_dir), batch_size
    )
    probabilities = softmax(outputs)
    seconds = time.perf_counter() - start
    out = df.copy()
    if "label" in out.columns:
        out["label"] = [id2label[int(i)] for i in out["label"]]
    out["predicted_label"] = [id2label[int(i)] for i in probabilities.argmax(axis=1)]
    for index, name in id2label.items():
        out[f"prob_{name}"] = probabilities[:, index].round(5)
    atomic_write_text(output_csv, out.to_csv(index=False))
    print(
        f"predicted {len(out)} rows in {seconds:.1f} s ({len(out) / max(seconds, 1e-9):.1f} "
        f"rows/s); wrote {output_csv}"
    )
    if "label" in df.columns:
        metrics = classification_metrics(df["label"].to_numpy(), probabilities.argmax(axis=1))
        print(
            f"accuracy {metrics['accuracy']:.4f} | balanced accuracy "
            f"{metrics['balanced_accuracy']:.4f} | macro-F1 {metrics['macro_f1']:.4f}"
        )
    return out


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
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="auto: bf16 on GPUs and on CPUs with native bf16, else fp32",
    )
    args = parser.parse_args(argv)
    output = args.output or f"{Path(args.input).stem}.predictions.csv"
    try:
        predict_file(args.model, args.input, output, args.batch_size, args.dtype)
    except (DataError, ModelError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
