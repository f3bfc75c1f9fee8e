"""Batched prediction sorted by length, the classification report and the confusion matrix.

Taught in notebook 05 (baseline) and notebook 07 (evaluation); used by ``helpers.train`` and
``helpers.predict``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
)
from tqdm.auto import tqdm


def classification_metrics(labels: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro-F1."""
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predictions)),
        # over the true classes only: a generative answer naming no label (-1) is an error, not a
        # 5th class
        "macro_f1": float(
            f1_score(
                labels, predictions, labels=np.unique(labels), average="macro", zero_division=0
            )
        ),
    }


def predict_logits(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int = 32,
    max_length: int = 512,
    progress: bool = True,
) -> np.ndarray:
    """Logits (n, num_labels) in the input order.

    Texts are sorted by length so each batch pads little; runs under ``torch.inference_mode``. Texts
    longer than ``max_length`` tokens are truncated, with one warning; empty texts get a prediction
    from the end-of-text token alone, with a warning.
    """
    texts = [str(t) for t in texts]
    encoded = tokenizer(texts, truncation=False)["input_ids"]
    empty = [i for i, ids in enumerate(encoded) if not ids]
    if empty:
        warnings.warn(
            f"{len(empty)} text(s) are empty (row indices {empty[:5]}); their predictions are from "
            "the end-of-text token alone and carry no information.",
            stacklevel=2,
        )
        for i in empty:
            texts[i] = tokenizer.eos_token
            encoded[i] = [tokenizer.eos_token_id]
    too_long = sum(len(ids) > max_length for ids in encoded)
    if too_long:
        warnings.warn(
            f"{too_long} text(s) exceed max_length={max_length} tokens and were truncated.",
            stacklevel=2,
        )
    order = np.argsort([len(ids) for ids in encoded], kind="stable")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks: list[np.ndarray] = []
    with torch.inference_mode():
        for start in tqdm(
            range(0, len(texts), batch_size), desc="predict", disable=not progress, leave=False
        ):
            batch = [texts[i] for i in order[start : start + batch_size]]
            inputs = tokenizer(
                batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            # logits of the last non-pad token; no key-value cache: nothing is generated
            logits = model(**inputs.to(device), use_cache=False).logits
            chunks.append(logits.float().cpu().numpy())
    model.train(was_training)
    if not chunks:
        return np.zeros((0, model.config.num_labels), dtype=np.float32)
    sorted_logits = np.concatenate(chunks)
    logits = np.empty_like(sorted_logits)
    logits[order] = sorted_logits
    return logits


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def evaluate_classifier(
    model: Any,
    tokenizer: Any,
    df: pd.DataFrame,
    batch_size: int = 32,
    max_length: int = 512,
    progress: bool = True,
) -> dict[str, Any]:
    """Metrics, predictions and logits of ``model`` on a DataFrame with ``text`` and ``label``."""
    logits = predict_logits(model, tokenizer, df["text"].tolist(), batch_size, max_length, progress)
    predictions = logits.argmax(axis=-1)
    labels = df["label"].to_numpy()
    return {
        "metrics": classification_metrics(labels, predictions),
        "predictions": predictions,
        "logits": logits,
    }


def report(labels: Sequence[int], predictions: Sequence[int], names: Sequence[str]) -> pd.DataFrame:
    """sklearn's classification report as a DataFrame (precision, recall, f1-score, support per
    class)."""
    table = classification_report(
        labels,
        predictions,
        labels=list(range(len(names))),
        target_names=list(names),
        output_dict=True,
        zero_division=0,
    )
    return pd.DataFrame(table).T.round(3)


def confusion(
    labels: Sequence[int], predictions: Sequence[int], names: Sequence[str]
) -> pd.DataFrame:
    """Confusion matrix with true labels as rows and predicted labels as columns."""
    matrix = confusion_matrix(labels, predictions, labels=list(range(len(names))))
    return pd.DataFrame(
        matrix, index=[f"true {n}" for n in names], columns=[f"pred {n}" for n in names]
    )
