"""The whole job without a notebook: split, baseline, QLoRA training, evaluation, adapter save, merge.

    python -m helpers.train [--profile NAME] [--config FILE.yaml] [--output-dir DIR] [--overwrite | --resume]

Writes into DIR (default ``runs/<profile>``): config.yaml, metrics.json, adapter/, merged/, test.csv,
test_predictions.csv, PNG plots, baseline.json and checkpoints/ (every ``save_steps`` steps; ``--resume``
continues from the last complete one). Notebooks 01-07 teach each step; this module strings them together.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import DataCollatorWithPadding, set_seed

from helpers.config import ConfigError, CourseConfig, load_config, save_config
from helpers.data import DataError, class_weights, course_splits, token_lengths, tokenize
from helpers.evaluation import confusion, evaluate_classifier
from helpers.io import atomic_write_json, atomic_write_text
from helpers.merging import load_for_inference, merge_and_save, merge_dtype, save_adapter
from helpers.modeling import ModelError, add_lora, compute_dtype, device, load_classifier, trainable_parameters
from helpers.plots import plot_class_distribution, plot_confusion_matrix, plot_token_lengths, plot_training_curves
from helpers.training import (
    RunFolderError, WeightedLossTrainer, compute_metrics, last_checkpoint, mean_training_loss, peak_memory_mb, training_arguments,
)


def _save(fig: Any, path: Path) -> None:
    fig.savefig(path, dpi=100)


def check_run_folder(out: Path, overwrite: bool = False, resume: bool = False) -> Path | None:
    """Decide what to do with ``out`` before anything is written; return the checkpoint to resume from.

    A finished run (metrics.json) or an interrupted one (checkpoints) is never replaced silently: the caller
    must say ``resume`` or ``overwrite``.
    """
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite contradict each other: pick one.")
    finished = (out / "metrics.json").exists()
    checkpoint = last_checkpoint(out / "checkpoints")
    if resume:
        if finished:
            raise RunFolderError(f"{out} holds a finished run (metrics.json): there is nothing to resume. "
                                 "Pass --overwrite to train again, or choose another --output-dir.")
        if checkpoint is None:
            raise RunFolderError(f"{out / 'checkpoints'} holds no complete checkpoint to resume from. "
                                 "Run without --resume to start training.")
        return checkpoint
    if overwrite:
        return None  # the old run is cleared by run(), only once the new data and model have loaded
    if finished:
        raise FileExistsError(
            f"{out} already holds a finished run (metrics.json). Pass --overwrite to replace it, "
            "or choose another --output-dir."
        )
    if checkpoint is not None:
        raise RunFolderError(
            f"{out} holds an interrupted run (last checkpoint: {checkpoint.name}). Pass --resume to continue it, "
            "--overwrite to start again, or choose another --output-dir."
        )
    return None


def run(config: CourseConfig, output_dir: str | Path, overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
    """Run the pipeline and return the metrics written to ``output_dir/metrics.json``.

    With ``resume``, training continues from the last complete checkpoint in ``output_dir/checkpoints``.
    """
    out = Path(output_dir)
    checkpoint = check_run_folder(out, overwrite, resume)
    # under `accelerate launch` every process trains; only the main one evaluates and writes files
    main_process = int(os.environ.get("RANK", "0")) == 0
    set_seed(config.seed)
    print(f"profile {config.profile} | model {config.model_name} | device {device()} | compute dtype {compute_dtype()}")

    # data and model come first: bad input fails here, before anything is written
    splits = course_splits(config)
    test = splits["test"]
    print({name: len(df) for name, df in splits.items()})
    model, tokenizer = load_classifier(config)

    if main_process:
        if overwrite:  # the folder no longer claims to be a finished or interrupted run
            (out / "metrics.json").unlink(missing_ok=True)
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
            (out / "baseline.json").unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
        atomic_write_text(out / "test.csv", test[["text", "label"]].to_csv(index=False))  # so predict can rerun it
        _save(plot_class_distribution(splits, config.labels), out / "class_distribution.png")
        _save(plot_token_lengths(token_lengths(splits["train"]["text"], tokenizer), config.max_length),
              out / "token_lengths.png")

    # baseline (random score head: expect about chance); kept on disk so a resumed run need not repeat it
    baseline_file = out / "baseline.json"
    if not main_process:
        baseline = {}
    elif checkpoint is not None and baseline_file.is_file():
        baseline = json.loads(baseline_file.read_text())
    else:
        print("baseline evaluation on the test split")
        baseline = evaluate_classifier(model, tokenizer, test, config.eval_batch_size, config.max_length)["metrics"]
        atomic_write_json(baseline_file, baseline)
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
    if checkpoint is not None:
        print(f"resuming from {checkpoint}")
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_seconds = time.perf_counter() - start
    train_loss = mean_training_loss(trainer.state.log_history)
    steps_here = trainer.state.global_step - (int(checkpoint.name.split("-")[1]) if checkpoint else 0)
    samples_here = min(steps_here * trainer.args.train_batch_size * config.gradient_accumulation_steps
                       * trainer.args.world_size, len(splits["train"]) * config.epochs)
    trainer_processes = trainer.args.world_size
    if not main_process:
        return {}
    _save(plot_training_curves(trainer.state.log_history), out / "training_curves.png")

    print("final evaluation on the test split")
    final_eval = evaluate_classifier(model, tokenizer, test, config.eval_batch_size, config.max_length)
    final = final_eval["metrics"]
    print("final", final)
    # the trained model's own outputs, so a reloaded adapter can be checked against them
    predictions = test[["label"]].assign(predicted=final_eval["predictions"])
    for index in range(config.num_labels):
        predictions[f"logit_{index}"] = final_eval["logits"][:, index]
    atomic_write_text(out / "test_predictions.csv", predictions.to_csv(index=False))
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
        "processes": trainer_processes,
        "test_rows": len(test),
        "baseline": baseline,
        "final": final,
        "merged": merged_metrics["metrics"],
        "merge_max_abs_logit_diff": merge_difference,
        "resumed_from": checkpoint.name if checkpoint else None,
        "train_seconds": round(train_seconds, 2),  # of this process only, when resumed
        "train_samples_per_second": round(samples_here / train_seconds, 3),
        "train_loss": round(train_loss, 4),
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
    parser.add_argument("--overwrite", action="store_true", help="replace a finished or interrupted run in --output-dir")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run from its last checkpoint, with the run's saved config.yaml")
    args = parser.parse_args(argv)
    out = None
    try:
        config = load_config(args.profile, args.config)
        out = Path(args.output_dir or Path("runs") / config.profile)
        if args.resume and (out / "config.yaml").is_file():
            config = resumed_config(out / "config.yaml", config if (args.profile or args.config) else None)
        run(config, out, overwrite=args.overwrite, resume=args.resume)
    except (ConfigError, DataError, ModelError, FileExistsError, RunFolderError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted. Continue with: python -m helpers.train --output-dir {out} --resume", file=sys.stderr)
        return 130
    return 0


def resumed_config(saved_yaml: Path, asked: CourseConfig | None) -> CourseConfig:
    """The config a run was started with; a different one asked for on resume is refused, naming the settings."""
    saved = load_config(None, saved_yaml)
    if asked is not None:
        changed = sorted(k for k, v in asked.to_dict().items() if saved.to_dict()[k] != v)
        if changed:
            raise ConfigError(
                f"--resume continues the run saved in {saved_yaml}, but these settings differ from it: {changed}. "
                "Drop --profile/--config to resume as saved, or start a new run in another --output-dir."
            )
    return saved


if __name__ == "__main__":
    sys.exit(main())
