"""Side-by-side benchmark: the common QLoRA recipe against the course's, on one model and machine.

    python -m benchmarks.bench [--profile NAME] [--output-dir DIR]
                               [--train-per-class N] [--test-per-class N]

Trains and evaluates both recipes in ONE process and prints a table, also written to DIR (default
``runs/bench-<profile>``) as ``bench.json`` (with ``ratios``, course over common) and ``bench.md``.

* **common**: what most tutorials do: LoRA r=16, alpha 8 on q/k/v/o, dropout 0.05, lr 1e-4, batch 8,
  max length 512, random batch order, gradient checkpointing (``prepare_model_for_kbit_training``'s
  default), transformers' default attention (SDPA); inference with the 4-bit adapter model in
  unsorted batches of 32.
* **course**: the profile's defaults as taught in notebooks 04-07: length-grouped batches,
  truncation fitted to the data, no gradient checkpointing where memory allows, LoRA on all linear
  layers, the attention kernel measured fastest for the device (``attention_implementation``);
  inference with the merged model in the serving precision, sorted by length, under
  ``inference_mode``.

Both use the same class-weighted Trainer, seed, split and test rows, and the machine's precision
(``helpers.hardware.mixed_precision``: bf16 autocast on GPUs and CPUs with native bf16); only the
recipe differs.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from transformers import DataCollatorWithPadding, set_seed

from helpers.config import PROFILES, ConfigError, CourseConfig, load_config, profile_names
from helpers.data import DataError, class_weights, course_splits, tokenize
from helpers.evaluation import classification_metrics, predict_logits
from helpers.hardware import (
    attention_implementation,
    device,
    hardware_name,
    mixed_precision,
    peak_memory_mb,
    reset_peak_memory,
)
from helpers.io import atomic_write_json, atomic_write_text
from helpers.merging import load_for_inference, merge_and_save, save_adapter
from helpers.modeling import ModelError, add_lora, load_classifier, trainable_parameters
from helpers.training import WeightedLossTrainer, training_arguments

COMMON_RECIPE = {
    "lora_r": 16,
    "lora_alpha": 8,
    "lora_dropout": 0.05,
    "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "learning_rate": 1e-4,
    "batch_size": 8,
    "max_length": 512,
    "gradient_checkpointing": True,
    "attn_implementation": "sdpa",  # transformers' default
}
COMMON_INFERENCE_BATCH = 32
WARMUP_ROWS = 8


def common_config(config: CourseConfig) -> CourseConfig:
    """The common recipe on top of a profile (same model, data, seed and epochs)."""
    return config.replace(**COMMON_RECIPE)


class CountingCollator(DataCollatorWithPadding):
    """Pads each batch to its longest text and counts real and padding tokens."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer)
        self.real_tokens = 0
        self.total_tokens = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().__call__(features)
        self.real_tokens += int(batch["attention_mask"].sum())
        self.total_tokens += int(batch["attention_mask"].numel())
        return batch


def _train(
    config: CourseConfig, splits: dict[str, pd.DataFrame], workdir: Path, common: bool
) -> tuple[Any, Any, dict[str, Any]]:
    set_seed(config.seed)
    model, tokenizer = load_classifier(config)
    model = add_lora(model, config)
    collator = CountingCollator(tokenizer)
    # both recipes: no evaluation or checkpoints inside the timed loop; common draws batches at
    # random
    overrides: dict[str, Any] = {
        "eval_strategy": "no",
        "save_strategy": "no",
        "logging_steps": 10**6,
    }
    if common:
        overrides["train_sampling_strategy"] = "random"
    trainer = WeightedLossTrainer(
        model=model,
        args=training_arguments(config, workdir / "trainer", **overrides),
        train_dataset=tokenize(splits["train"], tokenizer, config.max_length),
        data_collator=collator,
        class_weights=class_weights(splits["train"]["label"], config.num_labels),
    )
    gc.collect()
    reset_peak_memory()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    samples = len(splits["train"]) * config.epochs
    return (
        model,
        tokenizer,
        {
            "train_seconds": round(seconds, 2),
            "train_samples_per_second": round(samples / seconds, 3),
            "train_tokens_per_second": round(collator.real_tokens / seconds, 1),
            "padding_share": round(1 - collator.real_tokens / collator.total_tokens, 4),
            "train_peak_memory_mb": round(peak_memory_mb(), 1),
            "trainable_parameters": trainable_parameters(model)["trainable"],
        },
    )


def common_predict(model: Any, tokenizer: Any, texts: list[str], max_length: int) -> np.ndarray:
    """Tutorial-style inference: the trained 4-bit adapter model, input order, batches of 32,
    ``no_grad``."""
    # bitsandbytes' default CPU inference layout, which the course turns off for training
    # (helpers.modeling)
    from bitsandbytes.nn.modules import has_avx512bf16

    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = has_avx512bf16()
    model.eval()
    target = next(model.parameters()).device
    chunks = []
    with torch.no_grad():
        for start in range(0, len(texts), COMMON_INFERENCE_BATCH):
            batch = tokenizer(
                texts[start : start + COMMON_INFERENCE_BATCH],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ).to(target)
            chunks.append(model(**batch).logits.float().cpu().numpy())
    return np.concatenate(chunks)


def token_counts(lengths: list[int], batch_size: int, sort: bool) -> tuple[int, int]:
    """Real and padded tokens of inference over rows of these token ``lengths`` (already truncated),
    each batch padded to its longest row: in input order (the common recipe) or sorted by length
    (the course)."""
    ordered = sorted(lengths) if sort else list(lengths)
    batches = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    return sum(ordered), sum(max(batch) * len(batch) for batch in batches)


def inference_tokens(
    tokenizer: Any, texts: list[str], max_length: int, batch_size: int, sort: bool
) -> tuple[int, int]:
    """``token_counts`` of ``texts`` after truncation to ``max_length``."""
    return token_counts(
        [min(len(ids), max_length) for ids in tokenizer(texts)["input_ids"]], batch_size, sort
    )


def _inference(
    name: str, logits_fn: Any, test: pd.DataFrame, tokens: tuple[int, int]
) -> dict[str, Any]:
    # one untimed batch first, for both recipes: one-time kernel setup is not throughput
    logits_fn(test["text"].tolist()[:WARMUP_ROWS])
    reset_peak_memory()
    start = time.perf_counter()
    logits = logits_fn(test["text"].tolist())
    seconds = time.perf_counter() - start
    metrics = classification_metrics(test["label"].to_numpy(), logits.argmax(axis=1))
    print(
        f"{name}: inference {len(test) / seconds:.2f} samples/s, accuracy {metrics['accuracy']:.3f}"
    )
    return {
        "inference_samples_per_second": round(len(test) / seconds, 3),
        "inference_tokens_per_second": round(tokens[0] / seconds, 1),
        "inference_padding_share": round(1 - tokens[0] / tokens[1], 4),
        "inference_peak_memory_mb": round(peak_memory_mb(), 1),
        "accuracy": round(metrics["accuracy"], 4),
        "macro_f1": round(metrics["macro_f1"], 4),
    }


def run_common(
    config: CourseConfig, splits: dict[str, pd.DataFrame], workdir: Path
) -> dict[str, Any]:
    common = common_config(config)
    model, tokenizer, result = _train(common, splits, workdir, common=True)
    result.update(
        _inference(
            "common",
            lambda texts: common_predict(model, tokenizer, texts, common.max_length),
            splits["test"],
            inference_tokens(
                tokenizer,
                splits["test"]["text"].tolist(),
                common.max_length,
                COMMON_INFERENCE_BATCH,
                sort=False,
            ),
        )
    )
    return {
        "settings": {
            **COMMON_RECIPE,
            "train_sampling_strategy": "random",
            "serving": "4-bit adapter, unsorted, batch 32",
        },
        **result,
    }


def run_course(
    config: CourseConfig, splits: dict[str, pd.DataFrame], workdir: Path
) -> dict[str, Any]:
    model, tokenizer, result = _train(config, splits, workdir, common=False)
    save_adapter(model, tokenizer, config, workdir / "adapter")
    del model
    gc.collect()
    merge_and_save(workdir / "adapter", workdir / "merged")
    served, served_tokenizer, _ = load_for_inference(workdir / "merged")  # serving precision
    result.update(
        _inference(
            "course",
            lambda texts: predict_logits(
                served,
                served_tokenizer,
                texts,
                config.eval_batch_size,
                config.max_length,
                progress=False,
            ),
            splits["test"],
            inference_tokens(
                served_tokenizer,
                splits["test"]["text"].tolist(),
                config.max_length,
                config.eval_batch_size,
                sort=True,
            ),
        )
    )
    settings = {k: getattr(config, k) for k in COMMON_RECIPE}
    settings["attn_implementation"] = attention_implementation(config.attn_implementation).value
    dtype = str(next(served.parameters()).dtype).removeprefix("torch.")
    serving = f"merged, {dtype}, sorted, batch {config.eval_batch_size}"
    return {
        "settings": {**settings, "train_sampling_strategy": "group_by_length", "serving": serving},
        **result,
    }


RATIOS = {
    "train_throughput": "train_samples_per_second",
    "train_tokens_per_second": "train_tokens_per_second",
    "inference_throughput": "inference_samples_per_second",
    "inference_tokens_per_second": "inference_tokens_per_second",
    "accuracy": "accuracy",
    "macro_f1": "macro_f1",
    "train_peak_memory": "train_peak_memory_mb",
}


def ratios(common: dict[str, Any], course: dict[str, Any]) -> dict[str, float]:
    """Course over common for each compared figure (above 1: the course is faster, or more
    accurate)."""
    return {
        name: round(course[key] / common[key], 3) if common[key] else float("inf")
        for name, key in RATIOS.items()
    }


def markdown_table(result: dict[str, Any]) -> str:
    rows = [
        ("training samples/s", "train_samples_per_second", "train_throughput"),
        ("training tokens/s (real tokens)", "train_tokens_per_second", "train_tokens_per_second"),
        ("padding share of training tokens", "padding_share", None),
        ("peak memory while training (MiB)", "train_peak_memory_mb", "train_peak_memory"),
        ("test accuracy", "accuracy", "accuracy"),
        ("test macro-F1", "macro_f1", "macro_f1"),
        ("inference samples/s", "inference_samples_per_second", "inference_throughput"),
        (
            "inference tokens/s (real tokens)",
            "inference_tokens_per_second",
            "inference_tokens_per_second",
        ),
        ("padding share of inference tokens", "inference_padding_share", None),
        ("trainable parameters", "trainable_parameters", None),
    ]
    common, course, ratio = (
        result["recipes"]["common"],
        result["recipes"]["course"],
        result["ratios"],
    )
    lines = [
        f"{result['profile']} on {result['hardware']}: {result['train_rows']} training and "
        f"{result['test_rows']} test rows, one process, {result['date']}.",
        "",
        "| | common recipe | course recipe | course / common |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, key, ratio_key in rows:
        shown = f"{ratio[ratio_key]:.2f}x" if ratio_key else ""
        lines.append(f"| {label} | {common[key]:,} | {course[key]:,} | {shown} |")
    return "\n".join(lines) + "\n"


def run(
    config: CourseConfig, output_dir: str | Path, train_per_class: int, test_per_class: int
) -> dict[str, Any]:
    """Both recipes on the same split; returns what is written to ``bench.json``."""
    out = Path(output_dir)
    config = config.replace(
        train_per_class=train_per_class, val_per_class=1, test_per_class=test_per_class
    )
    splits = course_splits(config)
    print(
        f"device {device().value} | {len(splits['train'])} training rows, {len(splits['test'])} "
        "test rows"
    )
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        common = run_common(config, splits, Path(tmp) / "common")
        gc.collect()
        course = run_course(config, splits, Path(tmp) / "course")
    result = {
        "profile": config.profile,
        "model": config.model_name,
        "hardware": hardware_name(),
        "mixed_precision": mixed_precision().value,
        "date": time.strftime("%Y-%m-%d"),
        "train_rows": len(splits["train"]),
        "test_rows": len(splits["test"]),
        "recipes": {"common": common, "course": course},
        "ratios": ratios(common, course),
    }
    atomic_write_json(out / "bench.json", result)
    table = markdown_table(result)
    atomic_write_text(out / "bench.md", table)
    print(table)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--profile", help=f"one of: {profile_names()} (default: $COURSE_PROFILE or the hardware)"
    )
    parser.add_argument(
        "--output-dir", help="where bench.json and bench.md go (default: runs/bench-<profile>)"
    )
    parser.add_argument(
        "--train-per-class", type=int, help="training rows per class (default: the profile's)"
    )
    parser.add_argument(
        "--test-per-class", type=int, help="test rows per class (default: the profile's)"
    )
    args = parser.parse_args(argv)
    try:
        config = load_config(args.profile)
        train_default, test_default = PROFILES[config.profile].bench_sizes
        given = {"--train-per-class": args.train_per_class, "--test-per-class": args.test_per_class}
        defaults = {"--train-per-class": train_default, "--test-per-class": test_default}
        sizes = {flag: defaults[flag] if v is None else v for flag, v in given.items()}
        for flag, value in sizes.items():
            if value < 1:
                raise ConfigError(f"{flag} {value}: give at least 1 row per class.")
        output_dir = Path(args.output_dir or Path("runs") / f"bench-{config.profile}")
        try:  # an unusable folder fails now, not after the whole benchmark
            output_dir.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=output_dir).close()
        except OSError as error:
            raise ConfigError(
                f"--output-dir {output_dir} cannot be written ({error.strerror}). Choose another."
            ) from None
        run(config, output_dir, *sizes.values())
    except (ConfigError, DataError, ModelError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: the benchmark wrote nothing; run it again.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
