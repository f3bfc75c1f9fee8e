"""The whole job without a notebook: split, baseline, QLoRA training, evaluation, adapter save, merge.

    python -m helpers.train [--profile NAME] [--config FILE.yaml] [--output-dir DIR] [--overwrite]

Writes into DIR (default ``runs/<profile>``): config.yaml, metrics.json, adapter/, merged/, test.csv,
test_predictions.csv and PNG plots. Notebooks 01-07 teach each step; this module strings them together.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import DataCollatorWithPadding, set_seed

from helpers.config import ConfigError, CourseConfig, load_config, save_config
from helpers.data import DataError, class_weights, course_splits, token_lengths, tokenize
from helpers.evaluation import confusion, evaluate_classifier
from helpers.io import atomic_write_json
from helpers.merging import load_for_inference, merge_and_save, merge_dtype, save_adapter
from helpers.modeling import ModelError, add_lora, compute_dtype, device, load_classifier, trainable_parameters
from helpers.plots import plot_class_distribution, plot_confusion_matrix, plot_token_lengths, plot_training_curves
from helpers.training import WeightedLossTrainer, compute_metrics, peak_memory_mb, training_arguments


def _save(fig: Any, path: Path) -> None:
    fig.savefig(path, dpi=100)


def run(config: CourseConfig, output_dir: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Run the pipeline and return the metrics written to ``output_dir/metrics.json``."""
    out = Path(output_dir)
    if (out / "metrics.json").exists() and not overwrite:
        raise FileExistsError(
            f"{out} already holds a finished run (metrics.json). Pass --overwrite to replace it, "
            "or choose another --output-dir."
        )
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    set_seed(config.seed)
    print(f"profile {config.profile} | model {config.model_name} | device {device()} | compute dtype {compute_dtype()}")

    # data: the balanced split, written so that predict can be run on the same test rows
    splits = course_splits(config)
    test = splits["test"]
    test[["text", "label"]].to_csv(out / "test.csv", index=False)
    print({name: len(df) for name, df in splits.items()})

    # model and baseline (random score head: expect about chance)
    model, tokenizer = load_classifier(config)
    _save(plot_class_distribution(splits, config.labels), out / "class_distribution.png")
    _save(plot_token_lengths(token_lengths(splits["train"]["text"], tokenizer), config.max_length), out / "token_lengths.png")
    print("baseline evaluation on the test split")
    baseline = evaluate_classifier(model, tokenizer, test, config.eval_batch_size, config.max_length)["metrics"]
    print("baseline", baseline)

    # LoRA training with the class-weighted loss
    model = add_lora(model, config)
    params = trainable_parameters(model)
    print(f"trainable parameters {params['trainable']:,} of {params['total']:,} ({params['percent']:.2f}%)")
    trainer = WeightedLossTrainer(
        model=model,
        args=training_arguments(config, out / "checkpoints"),
        train_dataset=tokenize(splits["train"], tokenizer, config.max_length),
        eval_dataset=tokenize(splits["val"], tokenizer, config.max_length),
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
        class_weights=class_weights(splits["train"]["label"], config.num_labels) if config.use_class_weights else None,
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    train_output = trainer.train()
    train_seconds = time.perf_counter() - start
    _save(plot_training_curves(trainer.state.log_history), out / "training_curves.png")

    print("final evaluation on the test split")
    final_eval = evaluate_classifier(model, tokenizer, test, config.eval_batch_size, config.max_length)
    final = final_eval["metrics"]
    print("final", final)
    # the trained model's own outputs, so a reloaded adapter can be checked against them
    predictions = test[["label"]].assign(predicted=final_eval["predictions"])
    for index in range(config.num_labels):
        predictions[f"logit_{index}"] = final_eval["logits"][:, index]
    predictions.to_csv(out / "test_predictions.csv", index=False)
    _save(plot_confusion_matrix(confusion(test["label"], final_eval["predictions"], config.labels), config.labels),
          out / "confusion_matrix.png")

    # adapter, then a merged 16-bit (CPU: fp32) model checked against the unmerged adapter
    save_adapter(model, tokenizer, config, out / "adapter")
    del trainer, model
    _, _, merge_difference = merge_and_save(out / "adapter", out / "merged", check_texts=test["text"].tolist()[:64])
    # reload the saved folder, as predict will, rather than reuse the in-memory model
    merged_model, merged_tokenizer, _ = load_for_inference(out / "merged", dtype=merge_dtype())
    merged_metrics = evaluate_classifier(merged_model, merged_tokenizer, test, config.eval_batch_size, config.max_length)

    metrics = {
        "profile": config.profile,
        "hardware": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)",
        "test_rows": len(test),
        "baseline": baseline,
        "final": final,
        "merged": merged_metrics["metrics"],
        "merge_max_abs_logit_diff": merge_difference,
        "train_seconds": round(train_seconds, 2),
        "train_samples_per_second": round(len(splits["train"]) * config.epochs / train_seconds, 3),
        "train_loss": round(float(train_output.training_loss), 4),
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "trainable_parameters": params["trainable"],
    }
    atomic_write_json(out / "metrics.json", metrics)
    print(f"wrote {out / 'metrics.json'}: accuracy {baseline['accuracy']:.3f} -> {final['accuracy']:.3f} "
          f"in {train_seconds:.0f} s of training")
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.train", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="smollm2-cpu or llama3-8b (default: from $COURSE_PROFILE or the hardware)")
    parser.add_argument("--config", help="YAML file of settings that override the profile")
    parser.add_argument("--output-dir", help="run folder (default: runs/<profile>)")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished run in --output-dir")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.profile, args.config)
        run(config, args.output_dir or Path("runs") / config.profile, overwrite=args.overwrite)
    except (ConfigError, DataError, ModelError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
