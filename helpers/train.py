"""The whole job without a notebook: split, baseline, QLoRA training, evaluation, adapter save, merge.

    python -m helpers.train [--profile NAME] [--config FILE.yaml] [--task classify|instruct] [--output-dir DIR]
                            [--overwrite | --resume]

Writes into DIR (default ``runs/<profile>``, or ``runs/<profile>-instruct``): config.yaml, metrics.json, adapter/,
merged/, test.csv, test_predictions.csv, baseline.json and checkpoints/ (every ``save_steps`` steps; ``--resume``
continues from the last complete one), and for the head PNG plots. Notebooks 01-07 teach each step of the
classification head (``--task classify``); notebook 08 teaches instruction tuning (``--task instruct``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding, set_seed

from helpers.config import ConfigError, CourseConfig, load_config, save_config
from helpers.data import DataError, class_weights, course_splits, token_lengths, tokenize
from helpers.evaluation import confusion, evaluate_classifier
from helpers.io import atomic_write_json, atomic_write_text
from helpers.merging import (
    load_adapter, load_for_inference, merge, merge_and_save, merge_dtype, save_adapter, save_merged,
)
from helpers.instruct import (
    IGNORE_INDEX, ResponseLossTrainer, article_prompts, classify_prompts, evaluate_generative, instruct_dataset,
    instruct_records,
)
from helpers.modeling import (
    ModelError, add_lora, compute_dtype, device, hardware_name, load_causal_lm, load_classifier, serving_dtype,
    trainable_parameters,
)
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


def _prepare_folder(out: Path, config: CourseConfig, test: Any, overwrite: bool) -> None:
    """Once data and model have loaded: clear an overwritten run, write config.yaml and test.csv."""
    if overwrite:  # the folder no longer claims to be a finished or interrupted run
        (out / "metrics.json").unlink(missing_ok=True)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / "baseline.json").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    atomic_write_text(out / "test.csv", test[["text", "label"]].to_csv(index=False))  # so predict can rerun it


def _baseline(out: Path, checkpoint: Path | None, main_process: bool, evaluate: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The untrained model's metrics, kept in baseline.json so that a resumed run need not repeat them."""
    baseline_file = out / "baseline.json"
    if not main_process:
        return {}
    if checkpoint is not None and baseline_file.is_file():
        baseline = json.loads(baseline_file.read_text())
    else:
        baseline = evaluate()
        atomic_write_json(baseline_file, baseline)
    print("baseline", baseline)
    return baseline


def _head_baseline(model: Any, tokenizer: Any, test: Any, config: CourseConfig) -> dict[str, Any]:
    print("baseline evaluation on the test split")
    return evaluate_classifier(model, tokenizer, test, config.eval_batch_size, config.max_length)["metrics"]


def _generative_baseline(tokenizer: Any, test: Any, config: CourseConfig) -> dict[str, Any]:
    print(f"baseline (untrained {config.model_name}, {serving_dtype()}) on the test split")
    untrained, _ = load_causal_lm(config, load_in_4bit=False, dtype=serving_dtype(), prepare_for_training=False)
    return _generative_summary(evaluate_generative(untrained, tokenizer, test, config))


def _add_lora(model: Any, config: CourseConfig) -> tuple[Any, dict[str, float]]:
    model = add_lora(model, config)
    params = trainable_parameters(model)
    print(f"trainable parameters {params['trainable']:,} of {params['total']:,} ({params['percent']:.2f}%)")
    return model, params


def _train(trainer: Any, checkpoint: Path | None, config: CourseConfig, rows: int) -> tuple[float, float, float]:
    """Train (from ``checkpoint`` when resuming); returns seconds, mean training loss and samples this process saw."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if checkpoint is not None:
        print(f"resuming from {checkpoint}")
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    seconds = time.perf_counter() - start
    steps_here = trainer.state.global_step - (int(checkpoint.name.split("-")[1]) if checkpoint else 0)
    samples_here = min(steps_here * trainer.args.train_batch_size * config.gradient_accumulation_steps
                       * trainer.args.world_size, rows * config.epochs)
    return seconds, mean_training_loss(trainer.state.log_history), samples_here


def run(config: CourseConfig, output_dir: str | Path, overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
    """Run the pipeline and return the metrics written to ``output_dir/metrics.json``.

    With ``resume``, training continues from the last complete checkpoint in ``output_dir/checkpoints``.
    """
    if config.task == "instruct":
        return run_instruct(config, output_dir, overwrite, resume)
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
        _prepare_folder(out, config, test, overwrite)
        _save(plot_class_distribution(splits, config.labels), out / "class_distribution.png")
        _save(plot_token_lengths(token_lengths(splits["train"]["text"], tokenizer), config.max_length),
              out / "token_lengths.png")

    # baseline (random score head: expect about chance); kept on disk so a resumed run need not repeat it
    baseline = _baseline(out, checkpoint, main_process, partial(_head_baseline, model, tokenizer, test, config))

    # LoRA training with the class-weighted loss
    model, params = _add_lora(model, config)
    trainer = WeightedLossTrainer(
        model=model,
        args=training_arguments(config, out / "checkpoints"),
        train_dataset=tokenize(splits["train"], tokenizer, config.max_length),
        eval_dataset=tokenize(splits["val"], tokenizer, config.max_length),
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
        class_weights=class_weights(splits["train"]["label"], config.num_labels) if config.use_class_weights else None,
    )
    train_seconds, train_loss, samples_here = _train(trainer, checkpoint, config, len(splits["train"]))
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
        "hardware": hardware_name(),
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


MERGE_CHECK_ROWS = 32  # test rows whose greedy answers must be equal before and after the merge


def _generative_summary(result: dict[str, Any]) -> dict[str, Any]:
    """The JSON-able part of ``evaluate_generative``'s result."""
    summary = {"scored": result["scored"], "samples_per_second": round(result["samples_per_second"], 3)}
    if "generated" in result:
        summary.update({"generated": result["generated"], "valid_answers": result["valid_answers"]})
    return summary


def run_instruct(config: CourseConfig, output_dir: str | Path, overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
    """Instruction tuning (notebook 08): the same split, Alpaca records, a causal LM answering with the label name.

    Writes the same kind of run folder as ``run``; accuracy is measured by label scoring and by parsing greedy
    answers, before and after training, and the merged model's greedy answers are checked against the adapter's.
    """
    out = Path(output_dir)
    checkpoint = check_run_folder(out, overwrite, resume)
    main_process = int(os.environ.get("RANK", "0")) == 0
    set_seed(config.seed)
    print(f"task instruct | profile {config.profile} | model {config.model_name} | device {device()} "
          f"| compute dtype {compute_dtype()}")
    splits = course_splits(config)
    test = splits["test"]
    model, tokenizer = load_causal_lm(config)
    train_records = instruct_records(splits["train"], config, tokenizer)
    print(f"{len(train_records)} training records, {len(test)} test rows")
    if main_process:
        _prepare_folder(out, config, test, overwrite)

    # accuracy before training, in the precision the merged model will serve in (bf16 on this CPU), both ways
    baseline = _baseline(out, checkpoint, main_process, partial(_generative_baseline, tokenizer, test, config))
    model, params = _add_lora(model, config)
    trainer = ResponseLossTrainer(
        model=model,
        # accuracy on the test split, before and after, is the evaluation; no validation loss inside the timed loop
        args=training_arguments(config, out / "checkpoints", eval_strategy="no"),
        train_dataset=instruct_dataset(train_records, tokenizer, config.prompt_style),
        # pads input_ids with the pad token and labels with IGNORE_INDEX: padding carries no loss either
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX),
    )
    train_seconds, train_loss, samples_here = _train(trainer, checkpoint, config, len(train_records))
    trainer_processes = trainer.args.world_size
    if not main_process:
        return {}

    # adapter, then the merge into a 16-bit (CPU: fp32) base: greedy answers and label scores must not change
    save_adapter(model, tokenizer, config, out / "adapter")
    del trainer, model
    check = test.iloc[:MERGE_CHECK_ROWS]
    check_prompts = article_prompts(check["text"].tolist(), config, tokenizer)
    adapter_model, tokenizer = load_adapter(out / "adapter", load_in_4bit=False, dtype=merge_dtype())
    scores_before, answers_before = classify_prompts(adapter_model, tokenizer, check_prompts, config.labels,
                                                     config.max_new_tokens, config.eval_batch_size, config.prompt_style)
    merged_model = merge(adapter_model)
    scores_after, answers_after = classify_prompts(merged_model, tokenizer, check_prompts, config.labels,
                                                   config.max_new_tokens, config.eval_batch_size, config.prompt_style)
    save_merged(merged_model, tokenizer, out / "adapter", out / "merged")
    del merged_model, adapter_model

    # the saved merged model, as predict loads it, on the whole test split
    print("final evaluation of the merged model on the test split")
    served, served_tokenizer, _ = load_for_inference(out / "merged")
    final_eval = evaluate_generative(served, served_tokenizer, test, config)
    final = _generative_summary(final_eval)
    print("final", final)
    predictions = test[["label"]].assign(predicted=final_eval["scores"].argmax(axis=1), answer=final_eval["answers"],
                                         parsed=final_eval["parsed"])
    for index in range(config.num_labels):
        predictions[f"score_{index}"] = final_eval["scores"][:, index].round(5)
    atomic_write_text(out / "test_predictions.csv", predictions.to_csv(index=False))

    metrics = {
        "task": "instruct",
        "profile": config.profile,
        "hardware": hardware_name(),
        "processes": trainer_processes,
        "train_rows": len(train_records),
        "test_rows": len(test),
        "baseline": baseline,
        "final": final,
        "serving_dtype": str(next(served.parameters()).dtype).removeprefix("torch."),
        "merge_check_rows": len(check),
        "merge_max_abs_score_diff": float(abs(scores_after - scores_before).max()),
        "merged_answers_equal": sum(a == b for a, b in zip(answers_before, answers_after)) / len(check),
        "resumed_from": checkpoint.name if checkpoint else None,
        "train_seconds": round(train_seconds, 2),
        "train_samples_per_second": round(samples_here / train_seconds, 3),
        "train_loss": round(train_loss, 4),
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "trainable_parameters": params["trainable"],
    }
    atomic_write_json(out / "metrics.json", metrics)
    print(f"wrote {out / 'metrics.json'}: scored accuracy {baseline['scored']['accuracy']:.3f} -> "
          f"{final['scored']['accuracy']:.3f}, parsed {baseline['generated']['accuracy']:.3f} -> "
          f"{final['generated']['accuracy']:.3f} in {train_seconds:.0f} s of training")
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.train", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="smollm2-cpu or llama3-8b (default: from $COURSE_PROFILE or the hardware)")
    parser.add_argument("--config", help="YAML file of settings that override the profile")
    parser.add_argument("--task", choices=["classify", "instruct"],
                        help="classify: a classification head (default); instruct: answer with the label name (notebook 08)")
    parser.add_argument("--output-dir", help="run folder (default: runs/<profile>, runs/<profile>-instruct)")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished or interrupted run in --output-dir")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run from its last checkpoint, with the run's saved config.yaml")
    args = parser.parse_args(argv)
    out = None
    try:
        config = load_config(args.profile, args.config, **({"task": args.task} if args.task else {}))
        suffix = "-instruct" if config.task == "instruct" else ""
        out = Path(args.output_dir or Path("runs") / f"{config.profile}{suffix}")
        if args.resume and (out / "config.yaml").is_file():
            asked = args.profile or args.config or args.task
            config = resumed_config(out / "config.yaml", config if asked else None)
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
