"""Measure the course's two CPU speed choices in one process: bf16 autocast, attention kernel.

    python -m benchmarks.cpu_speed_choices [--steps 5] [--repeats 3] [--gemm-only]
                                           [--output FILE.json]

Training: the course's 4-bit model with LoRA on all linear layers, one fixed batch of 8 training
rows, the optimizer step included; seconds per step for fp32, bf16 autocast with SDPA, and bf16
autocast with eager attention, taken in turns so that drifts in machine speed hit every setting
alike. Inference: the untrained model in bf16 on the first 64 test rows, SDPA against eager, rows
per second. Matrix products: GFLOP/s of one bf16 and one fp32 product of the shape of an MLP layer
on a batch of 32 rows of ~55 tokens, the ceiling for the model's matrix products on this machine.
``--gemm-only`` measures only these (seconds; the bf16 training steps take minutes on a CPU without
native bf16). The median over the repeats is reported. The choices it supports:
``helpers.hardware.mixed_precision`` and ``helpers.hardware.attention_implementation``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import DataCollatorWithPadding, set_seed

from benchmarks.probes import matrix_product_gflops
from helpers.config import load_config
from helpers.data import course_splits, tokenize
from helpers.evaluation import predict_logits
from helpers.hardware import hardware_name
from helpers.modeling import add_lora, load_classifier


def timed(fn, repeat: int) -> float:
    fn()  # untimed: one-time setup of kernels and caches
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=5, help="timed training steps per setting and repeat"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gemm-only", action="store_true", help="only the matrix products")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    result: dict[str, object] = {"hardware": hardware_name()}
    if not args.gemm_only:
        result.update(training_and_inference(args.steps, args.repeats))
    result["matrix_product_gflops"] = {
        str(dtype).removeprefix("torch."): round(matrix_product_gflops(dtype))
        for dtype in (torch.bfloat16, torch.float32)
    }
    print(json.dumps(result, indent=2))
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")


def training_and_inference(steps: int, repeats: int) -> dict[str, object]:
    config = load_config("smollm2-cpu").replace(val_per_class=1, test_per_class=16)
    splits = course_splits(config)
    set_seed(config.seed)
    model, tokenizer = load_classifier(config.replace(attn_implementation="sdpa"))
    model = add_lora(model, config)
    rows = tokenize(splits["train"].head(8), tokenizer, config.max_length)
    batch = DataCollatorWithPadding(tokenizer)(
        [{k: r[k] for k in ("input_ids", "attention_mask")} for r in rows]
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def step(autocast: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch).logits.float().logsumexp(-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    settings = {
        "fp32, sdpa": (False, "sdpa"),
        "bf16 autocast, sdpa": (True, "sdpa"),
        "bf16 autocast, eager": (True, "eager"),
    }
    train: dict[str, list[float]] = {name: [] for name in settings}
    model.train()
    for _ in range(repeats):
        for name, (autocast, attention) in settings.items():
            model.set_attn_implementation(attention)
            train[name].append(timed(lambda autocast=autocast: step(autocast), steps))

    served, _ = load_classifier(
        config, load_in_4bit=False, dtype=torch.bfloat16, prepare_for_training=False
    )
    texts = splits["test"]["text"].tolist()
    infer: dict[str, list[float]] = {"sdpa": [], "eager": []}
    for _ in range(repeats):
        for attention in infer:
            served.set_attn_implementation(attention)
            seconds = timed(
                lambda: predict_logits(
                    served, tokenizer, texts, 32, config.max_length, progress=False
                ),
                1,
            )
            infer[attention].append(len(texts) / seconds)

    return {
        "tokens_per_training_batch": int(batch["attention_mask"].numel()),
        "train_seconds_per_step": {k: round(statistics.median(v), 3) for k, v in train.items()},
        "inference_rows_per_second_bf16": {
            k: round(statistics.median(v), 2) for k, v in infer.items()
        },
    }


if __name__ == "__main__":
    main()
