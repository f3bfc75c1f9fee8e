"""The whole job without a notebook, step by step in the order of the notebooks.

    python -m helpers.train [--profile NAME] [--config FILE.yaml] [--task classify|instruct]
                            [--output-dir DIR] [--overwrite | --resume] [--upload URL]

Writes into DIR (default ``runs/<profile>``, or ``runs/<profile>-instruct``): config.yaml,
metrics.json, adapter/ and merged/ (each with a model card, README.md), test.csv,
test_predictions.csv, baseline.json and checkpoints/
(every ``save_steps`` steps; ``--resume`` continues from the last complete one), and for the
classification head PNG plots. Notebooks 01-07 teach each step of the classification head
(``--task classify``); notebook 08 teaches instruction tuning (``--task instruct``), which shares
the first and last steps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
from accelerate.utils import release_memory
from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding, set_seed

from helpers.config import ConfigError, CourseConfig, load_config, profile_names, save_config
from helpers.data import DataError, class_weights, course_splits, token_lengths, tokenize
from helpers.evaluation import confusion, evaluate_classifier
from helpers.hardware import (
    compute_dtype,
    hardware_name,
    merge_dtype,
    peak_memory_mb,
    reset_peak_memory,
    serving_dtype,
)
from helpers.instruct import (
    IGNORE_INDEX,
    ResponseLossTrainer,
    evaluate_generative,
    instruct_dataset,
    instruct_records,
)
from helpers.io import atomic_write_json, atomic_write_text
from helpers.merging import load_for_inference, merge_and_save, save_adapter
from helpers.modeling import (
    ModelError,
    add_lora,
    check_lora_targets,
    load_for_task,
    trainable_parameters,
)
from helpers.notebook import COLAB_DRIVE, KAGGLE_WORKING, local_outputs_root
from helpers.plots import (
    plot_class_distribution,
    plot_confusion_matrix,
    plot_token_lengths,
    plot_training_curves,
)
from helpers.publish import PublishError, open_destination, publish, write_model_cards
from helpers.training import (
    RunFolderError,
    WeightedLossTrainer,
    compute_metrics,
    last_checkpoint,
    mean_training_loss,
    training_arguments,
)

MERGE_CHECK_ROWS = 32  # test rows on which the merged model must decide as the adapter model does


def run(
    config: CourseConfig,
    output_dir: str | Path,
    overwrite: bool = False,
    resume: bool = False,
    merged_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Run the job and return the metrics written to ``output_dir/metrics.json``.

    With ``resume``, training continues from the last complete checkpoint in
    ``output_dir/checkpoints``. The merged model goes to ``merged_dir`` (default
    ``default_merged_dir``: ``output_dir/merged``, or on a hosted runtime's Drive or
    /kaggle/working the local disk).
    """
    final = Path(output_dir)
    merged_dir = Path(merged_dir) if merged_dir else default_merged_dir(final)
    checkpoint = check_run_folder(final, overwrite, resume)
    # under `accelerate launch` only rank 0 writes
    main_process = int(os.environ.get("RANK", "0")) == 0
    # locked; an overwritten run is built beside the old one and swapped in only when complete
    with run_folder(final, replace=overwrite and final.exists(), main_process=main_process) as out:
        instruct = config.task == "instruct"
        set_seed(config.seed)
        print(
            f"task {config.task} | profile {config.profile} | model {config.model_name} | "
            f"{hardware_name()} | compute dtype {str(compute_dtype().value).removeprefix('torch.')}"
        )

        # ---- 01 data and balancing: the seeded, class-balanced split (bad data fails first)
        splits = course_splits(config)
        test = splits["test"]
        print({name: len(df) for name, df in splits.items()})

        # ---- 03 loading in 4-bit: a classification head, or the model's own LM head (08)
        model, tokenizer = load_for_task(config)
        check_lora_targets(model, config)  # a typo in lora_target_modules fails before any write
        if instruct:
            train_rows = instruct_records(splits["train"], config, tokenizer)
            train_data = instruct_dataset(train_rows, tokenizer, config.prompt_style)
        else:
            train_rows = splits["train"]
            train_data = tokenize(train_rows, tokenizer, config.max_length)
        if main_process:
            prepare_folder(out, config, test)
            if not instruct:
                plot_class_distribution(splits, config.labels, out / "class_distribution.png")
                plot_token_lengths(
                    token_lengths(train_rows["text"], tokenizer),
                    config.max_length,
                    out / "token_lengths.png",
                )

        # ---- 04 LoRA: small trainable matrices beside the frozen 4-bit weights
        model = add_lora(model, config)
        params = trainable_parameters(model)
        checkpointing = bool(model.is_gradient_checkpointing)  # as helpers.memory decided at load
        print(
            f"trainable parameters {params['trainable']:,} of {params['total']:,} "
            f"({params['percent']:.2f}%) | gradient checkpointing {checkpointing}"
        )

        # ---- 05 baseline: the untrained model on the test split (LoRA starts at zero, so the
        #      outputs are the untrained model's); kept on disk, so --resume skips it
        baseline: dict[str, Any] = {}
        if main_process:
            if checkpoint is not None and (out / "baseline.json").is_file():
                baseline = json.loads((out / "baseline.json").read_text())
            else:
                print("baseline: the untrained model on the test split")
                baseline = evaluate_on_test(model, tokenizer, test, config)["metrics"]
                atomic_write_json(out / "baseline.json", baseline)
            print("baseline", baseline)

        # ---- 06 training: the class-weighted loss of 02, or (08) the loss on the answers only
        if instruct:
            # the test split before and after is the evaluation: no validation inside the timed loop
            trainer = ResponseLossTrainer(
                model=model,
                args=training_arguments(config, out / "checkpoints", eval_strategy="no"),
                train_dataset=train_data,
                # pads labels with IGNORE_INDEX: padding carries no loss either
                data_collator=DataCollatorForSeq2Seq(
                    tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX
                ),
            )
        else:
            trainer = WeightedLossTrainer(
                model=model,
                args=training_arguments(config, out / "checkpoints"),
                train_dataset=train_data,
                eval_dataset=tokenize(splits["val"], tokenizer, config.max_length, by_length=True),
                data_collator=DataCollatorWithPadding(tokenizer),
                compute_metrics=compute_metrics,
                class_weights=class_weights(train_rows["label"], config.num_labels)
                if config.use_class_weights
                else None,
            )
        reset_peak_memory()
        if checkpoint is not None:
            print(f"resuming from {checkpoint}")
        start = time.perf_counter()
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        train_seconds = time.perf_counter() - start
        log = trainer.state.log_history
        steps_here = trainer.state.global_step - (
            int(checkpoint.name.split("-")[1]) if checkpoint else 0
        )
        samples_here = min(
            steps_here
            * trainer.args.train_batch_size
            * config.gradient_accumulation_steps
            * trainer.args.world_size,
            len(train_rows) * config.epochs,
        )
        processes = trainer.args.world_size
        if not main_process:
            return {}

        # ---- 07 evaluation and merging: the trained model, then (recorded first, so that a merge
        #      stopped by a full disk or a kill loses nothing) the merged model that is served
        if not instruct:
            plot_training_curves(
                log,
                out / "training_curves.png",
                examples_per_step=trainer.args.train_batch_size
                * config.gradient_accumulation_steps
                * trainer.args.world_size,
            )
        print("final evaluation on the test split")
        trained = evaluate_on_test(model, tokenizer, test, config)
        write_predictions(out, test, trained, config)
        if not instruct:
            plot_confusion_matrix(
                confusion(test["label"], trained["predictions"], config.labels),
                config.labels,
                out / "confusion_matrix.png",
            )
        save_adapter(model, tokenizer, config, out / "adapter")
        metrics = {
            "task": config.task,
            "profile": config.profile,
            "hardware": hardware_name(),
            "processes": processes,
            "train_rows": len(train_rows),
            "test_rows": len(test),
            "baseline": baseline,
            "final": trained["metrics"],
            "merged": None,  # filled in once the merge is done and checked
            "merged_dir": str(merged_dir.resolve()),
            "resumed_from": checkpoint.name if checkpoint else None,
            "train_seconds": round(train_seconds, 2),  # of this process only, when resumed
            "train_samples_per_second": round(samples_here / train_seconds, 3),
            "train_loss": round(mean_training_loss(log), 4),
            "peak_memory_mb": round(peak_memory_mb(), 1),
            "gradient_checkpointing": checkpointing,
            "trainable_parameters": params["trainable"],
        }
        atomic_write_json(out / "metrics.json", metrics)
        trainer, model = release_memory(trainer, model)  # gc breaks accelerate's reference cycle
        metrics.update(merge_and_serve(out, merged_dir, test, config, trained))
        atomic_write_json(out / "metrics.json", metrics)
        # README.md in adapter/ and merged/, from config.yaml and metrics.json
        write_model_cards(out)
        accuracy = (lambda m: m["scored"]["accuracy"]) if instruct else (lambda m: m["accuracy"])
        print(
            f"wrote {final / 'metrics.json'}: accuracy {accuracy(baseline):.3f} -> "
            f"{accuracy(metrics['final']):.3f} after {train_seconds:.0f} s of training"
        )
        return metrics


def default_merged_dir(out: Path) -> Path:
    """``out/merged``; for a run folder in a hosted runtime's kept storage (Google Drive,
    /kaggle/working), the runtime's local disk: a merged Llama 3 8B is 15-16 GB."""
    resolved = out.resolve()
    for kept in (COLAB_DRIVE.resolve(), KAGGLE_WORKING.resolve()):
        if resolved.is_relative_to(kept):
            return local_outputs_root() / "runs" / resolved.relative_to(kept) / "merged"
    return out / "merged"


def merge_and_serve(
    out: Path, merged_dir: Path, test: pd.DataFrame, config: CourseConfig, trained: dict[str, Any]
) -> dict[str, Any]:
    """Merge ``out/adapter`` into ``merged_dir``, check it, and evaluate what is served on the test
    split: the merged model, or where it does not fit this GPU the adapter on its 4-bit base (the
    trained model itself, already evaluated as ``trained``). Returns the metrics to record."""
    served, served_tokenizer, check = merge_and_save(
        out / "adapter", merged_dir, test["text"].tolist()[:MERGE_CHECK_ROWS]
    )
    metrics: dict[str, Any] = {"served": "merged" if served is not None else "adapter"}
    if served is None:  # the adapter on the 4-bit base is the trained model: evaluated above
        metrics["merged"] = trained["metrics"]
    else:
        if served_dtype_differs(config):
            served = None  # free the merge-dtype copy first
            served, served_tokenizer, _ = load_for_inference(merged_dir)
        print("evaluation of the merged model on the test split")
        metrics["merged"] = evaluate_on_test(served, served_tokenizer, test, config)["metrics"]
        metrics["serving_dtype"] = str(next(served.parameters()).dtype).removeprefix("torch.")
    if check is not None:
        metrics["merge_check"] = check
        if not check["passed"]:
            print(
                "WARNING: the merge check failed (the merged model differs from the trained "
                f"one): {check}"
            )
    print("merged", metrics["merged"])
    return metrics


def served_dtype_differs(config: CourseConfig) -> bool:
    """Whether the model served is in another precision than the merged one checked: instruct
    models are served in the serving precision (the head's merge check already is)."""
    return config.task == "instruct" and serving_dtype().value != merge_dtype().value


# ---------------------------------------------------------------- the steps' helpers
def evaluate_on_test(
    model: Any, tokenizer: Any, test: pd.DataFrame, config: CourseConfig
) -> dict[str, Any]:
    """The model on the test split: ``metrics`` (JSON-able) and the raw outputs.

    The head: logits and predictions (notebook 05). Instruct: label scores and greedy answers, as
    notebook 08 measures them.
    """
    if config.task != "instruct":
        return evaluate_classifier(
            model, tokenizer, test, config.eval_batch_size, config.max_length
        )
    result = evaluate_generative(model, tokenizer, test, config)
    result["metrics"] = {key: result[key] for key in ("scored", "generated", "valid_answers")}
    result["metrics"]["samples_per_second"] = round(result["samples_per_second"], 3)
    return result


def write_predictions(
    out: Path, test: pd.DataFrame, result: dict[str, Any], config: CourseConfig
) -> None:
    """test_predictions.csv: each test row's label, prediction and outputs, to check reloaded models
    against."""
    if config.task == "instruct":
        table = test[["label"]].assign(
            predicted=result["scores"].argmax(axis=1),
            answer=result["answers"],
            parsed=result["parsed"],
        )
        outputs, name = result["scores"].round(5), "score"
    else:
        table = test[["label"]].assign(predicted=result["predictions"])
        outputs, name = result["logits"], "logit"
    for index in range(config.num_labels):
        table[f"{name}_{index}"] = outputs[:, index]
    atomic_write_text(out / "test_predictions.csv", table.to_csv(index=False))


def check_run_folder(out: Path, overwrite: bool = False, resume: bool = False) -> Path | None:
    """Decide what to do with ``out`` before anything is written; return the checkpoint to resume
    from.

    A finished run (metrics.json) or an interrupted one (checkpoints) is never replaced silently:
    the caller must say ``resume`` or ``overwrite``.
    """
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite contradict each other: pick one.")
    finished = (out / "metrics.json").exists()
    checkpoint = last_checkpoint(out / "checkpoints")
    if resume:
        if finished:
            raise RunFolderError(
                f"{out} holds a finished run (metrics.json): there is nothing to resume. "
                "Pass --overwrite to train again, or choose another --output-dir."
            )
        if checkpoint is None:
            raise RunFolderError(
                f"{out / 'checkpoints'} holds no complete checkpoint to resume from. "
                "Run without --resume to start training."
            )
        return checkpoint
    if overwrite:
        run_like = any(
            (out / name).exists() for name in ("config.yaml", "metrics.json", "checkpoints")
        )
        if out.is_dir() and any(out.iterdir()) and not run_like:
            raise RunFolderError(
                f"{out} holds files that are not a run of this course: --overwrite would replace "
                "them all. Choose another --output-dir."
            )
        return None  # run_folder builds the new run aside and swaps it in when it is complete
    if finished:
        raise FileExistsError(
            f"{out} already holds a finished run (metrics.json). Pass --overwrite to "
            "replace it, or choose another --output-dir."
        )
    if checkpoint is not None:
        raise RunFolderError(
            f"{out} holds an interrupted run (last checkpoint: {checkpoint.name}). Pass "
            "--resume to continue it, --overwrite to start again, or choose another --output-dir."
        )
    return None


STALE = (".new", ".old")  # beside a run folder: a build or a swap that a killed run left


@contextlib.contextmanager
def run_folder(out: Path, replace: bool, main_process: bool = True) -> Iterator[Path]:
    """The folder a run writes into: ``out``, or with ``replace`` the sibling ``.NAME.new``, which
    replaces ``out`` only once the run is complete, so a failure at any point leaves the old run
    exactly as it was (and the unfinished new one is removed).

    A lock file (``.NAME.lock``, holding the process id) refuses a second run into the same
    folder; one left by a process that no longer exists is taken over. Leftovers of killed runs (a
    build or a swap beside the folder, a merge's temporary folder inside it) are removed first,
    each with a line saying so. Only the main process locks, cleans and swaps.
    """
    build = out.with_name(f".{out.name}.new")
    if not main_process:
        yield build if replace else out
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.with_name(f".{out.name}.lock")
    _take_lock(lock, out)
    try:
        old = out.with_name(f".{out.name}.old")
        if old.is_dir() and not out.exists():  # killed between the two renames of a swap
            os.replace(old, out)
            print(f"restored {out} from {old}, left by a run stopped while swapping it in")
        inside = list(out.glob(".*.tmp")) if out.is_dir() else []  # atomic writes cut off
        for stale in [out.with_name(f".{out.name}{s}") for s in STALE] + inside:
            if stale.is_dir():
                shutil.rmtree(stale)
            elif stale.is_file():
                stale.unlink()
            else:
                continue
            print(f"removed {stale}, left by a run that was stopped")
        if not replace:
            yield out
            return
        build.mkdir()
        try:
            yield build
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
        os.replace(out, old)
        os.replace(build, out)
        shutil.rmtree(old)
    finally:
        lock.unlink(missing_ok=True)


def _take_lock(lock: Path, out: Path) -> None:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
        text = lock.read_text().strip()
        pid = int(text) if text.isdigit() else 0
        if pid and _alive(pid):
            raise RunFolderError(
                f"another run (process {pid}) is writing {out}. Wait for it to finish, or choose "
                f"another --output-dir (if no run is going on, delete {lock})."
            ) from None
        lock.unlink(missing_ok=True)
        print(f"removed the lock {lock}: the run that held it (process {pid}) has stopped")
        _take_lock(lock, out)
        return
    with os.fdopen(fd, "w") as handle:
        handle.write(str(os.getpid()))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def prepare_folder(out: Path, config: CourseConfig, test: pd.DataFrame) -> None:
    """Once data, model and LoRA targets have checked out: write config.yaml and test.csv."""
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    # predict can rerun it
    atomic_write_text(out / "test.csv", test[["text", "label"]].to_csv(index=False))


def resumed_config(saved_yaml: Path, asked: CourseConfig | None) -> CourseConfig:
    """The config a run was started with; a different one asked for on resume is refused, naming the
    settings."""
    saved = load_config(None, saved_yaml)
    if asked is not None:
        changed = sorted(k for k, v in asked.to_dict().items() if saved.to_dict()[k] != v)
        if changed:
            raise ConfigError(
                f"--resume continues the run saved in {saved_yaml}, but these settings differ from "
                f"it: {changed}. "
                "Drop --profile/--config to resume as saved, or start a new run in another "
                "--output-dir."
            )
    return saved


# ---------------------------------------------------------------- the command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m helpers.train", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--profile",
        help=f"one of: {profile_names()} (default: $COURSE_PROFILE, else the "
        "hardware's: a GPU profile where a GPU is usable)",
    )
    parser.add_argument("--config", help="YAML file of settings that override the profile")
    parser.add_argument(
        "--task",
        choices=["classify", "instruct"],
        help="classify: a classification head (default); instruct: answer with the label name",
    )
    parser.add_argument(
        "--output-dir", help="run folder (default: runs/<profile>, runs/<profile>-instruct)"
    )
    parser.add_argument(
        "--merged-dir",
        help="where the merged model goes (default: DIR/merged; for a DIR on Google Drive or in "
        "/kaggle/working, the runtime's local disk: a merged Llama 3 8B is 15-16 GB)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a finished or interrupted run"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from its last checkpoint, with its saved config.yaml",
    )
    parser.add_argument(
        "--upload",
        metavar="URL",
        help="then upload merged/ there (gs://, s3://, hf://USER/REPO, a folder): helpers.publish",
    )
    args = parser.parse_args(argv)
    out = None
    try:
        config = load_config(
            args.profile, args.config, **({"task": args.task} if args.task else {})
        )
        suffix = "-instruct" if config.task == "instruct" else ""
        out = Path(args.output_dir or Path("runs") / f"{config.profile}{suffix}")
        if args.resume and (out / "config.yaml").is_file():
            asked = args.profile or args.config or args.task
            config = resumed_config(out / "config.yaml", config if asked else None)
        if args.upload:  # an unknown protocol or a missing package fails before any work
            try:
                open_destination(args.upload)
            except PublishError as error:
                raise ConfigError(f"--upload: {error}") from None
        run(config, out, args.overwrite, args.resume, args.merged_dir)
        if args.upload and int(os.environ.get("RANK", "0")) == 0:
            publish(out, args.upload)
    except (ConfigError, DataError, ModelError, FileExistsError, RunFolderError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except PublishError as error:
        print(
            f"error: {error} (the run is saved in {out}; upload it with "
            f"python -m helpers.publish {out} URL)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        if args.overwrite:
            hint = f"the run in {out} is as it was; run again with --overwrite to replace it"
        else:
            hint = f"continue with: python -m helpers.train --output-dir {out} --resume"
        print(f"\ninterrupted: {hint}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
