"""Would int8 serving make inference faster on the CPU? The merged model against its int8 copy.

    python -m benchmarks.int8_serving_check RUN_DIR   (a finished `python -m helpers.train` run)

Predicts RUN_DIR's test rows with the merged model in the serving precision, then with
``torch.ao.quantization.quantize_dynamic`` (int8 weights, activations quantized per batch) on its
linear layers, and prints rows/s, accuracy, the share of predictions that agree and the largest
logit difference. The course does not serve in int8: on the CPUs measured it changed about one
prediction in ten and cost accuracy.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from helpers.config import load_config
from helpers.evaluation import predict_logits
from helpers.hardware import hardware_name
from helpers.merging import load_for_inference


def timed_predict(model, tokenizer, texts: list[str], max_length: int) -> tuple[np.ndarray, float]:
    predict_logits(model, tokenizer, texts[:8], 32, max_length, progress=False)  # untimed warm-up
    start = time.perf_counter()
    logits = predict_logits(model, tokenizer, texts, 32, max_length, progress=False)
    return logits, len(texts) / (time.perf_counter() - start)


def main(run_dir: str) -> None:
    run = Path(run_dir)
    model, tokenizer, _ = load_for_inference(run / "merged")
    max_length = load_config(yaml_path=run / "config.yaml").max_length
    test = pd.read_csv(run / "test.csv")
    texts, labels = test["text"].tolist(), test["label"].to_numpy()
    reference, reference_speed = timed_predict(model, tokenizer, texts, max_length)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        int8 = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    logits, int8_speed = timed_predict(int8, tokenizer, texts, max_length)
    print(
        json.dumps(
            {
                "hardware": hardware_name(),
                "rows": len(texts),
                "merged": {
                    "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                    "rows_per_second": round(reference_speed, 2),
                    "accuracy": round(float((reference.argmax(1) == labels).mean()), 4),
                },
                "int8_dynamic": {
                    "rows_per_second": round(int8_speed, 2),
                    "accuracy": round(float((logits.argmax(1) == labels).mean()), 4),
                },
                "speedup": round(int8_speed / reference_speed, 2),
                "same_prediction_share": round(
                    float((logits.argmax(1) == reference.argmax(1)).mean()), 4
                ),
                "max_logit_difference": round(float(np.abs(logits - reference).max()), 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.split("\n\n")[1].strip())
    main(sys.argv[1])
