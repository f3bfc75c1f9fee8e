"""The class-weighted Trainer, the metrics and the training arguments.

Taught in notebook 06 (training); used by ``helpers.train``.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from helpers.config import ConfigError, CourseConfig
from helpers.evaluation import classification_metrics
from helpers.hardware import device, mixed_precision


class CourseTrainer(Trainer):
    """The Trainer, leaving the model as it found it: in its own precision once ``train()`` returns.

    Under bf16/fp16 mixed precision, accelerate wraps ``model.forward`` in autocast and the Trainer
    leaves the wrapper on, so anything run with the model after training (an evaluation, generation)
    would run in 16-bit while the saved adapter, reloaded, runs in the model's precision. Base of
    ``WeightedLossTrainer`` (``helpers.train``) and ``ResponseLossTrainer`` (notebook 08).

    Every course Trainer also stops, with ``TrainingDiverged``, at the first step whose loss is not
    finite or whose fp16 loss scale has collapsed (``StopOnNonFiniteLoss``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        given = [c for c in self.callback_handler.callbacks if isinstance(c, StopOnNonFiniteLoss)]
        if given:
            for callback in given:
                callback.trainer = callback.trainer or self
        else:
            self.add_callback(StopOnNonFiniteLoss(self))

    def train(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().train(*args, **kwargs)
        finally:
            # drops the autocast wrapper
            self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)


class TrainingDiverged(ConfigError):
    """Training stopped because its loss (or fp16 loss scale) went where no learning happens; the
    message names the step and the fix. A ``ConfigError``: the fix is a setting."""


# GradScaler starts at 2**16 and halves the scale at every step whose gradients overflow (skipping
# that optimizer step); it doubles it only after 2,000 clean steps. Below 1e-4 it has halved ~30
# times more than it grew: the gradients overflow fp16 even with the loss shrunk 10,000-fold, so the
# overflow is in the model's own activations, not in the scaling, and every step is skipped.
MIN_LOSS_SCALE = 1e-4


class StopOnNonFiniteLoss(TrainerCallback):
    """Raises ``TrainingDiverged`` as soon as the loss is NaN or inf, before the step is saved.

    A raised exception, not ``control.should_training_stop``: stopping would still save the
    checkpoint and let the caller save the adapter, both broken. The Trainer calls callbacks
    without catching, so the exception leaves ``trainer.train()``.

    Where it looks: ``on_step_end``, which the Trainer calls after each optimizer step and before
    it logs, evaluates or saves, reads the Trainer's running loss ``_tr_loss`` (the sum of the
    losses since the last log, on the device); a NaN at any micro-step makes the sum NaN, so the
    first bad step is caught whatever ``logging_steps`` is. ``on_log`` alone would see it only at
    the next logging step, after any checkpoint saved in between, or never where the run ends
    between two logging steps. With fp16 it also watches the gradient scaler's scale. ``on_log``
    checks the evaluation loss, and the training loss where the callback has no trainer
    (``StopOnNonFiniteLoss()`` added to any Trainer).
    """

    def __init__(self, trainer: Trainer | None = None) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any):
        # the Trainer's default replaces a NaN/inf step loss by the running mean, so the logged
        # and running losses would stay finite while the weights turn NaN; with the filter off
        # the NaN reaches them. It also drops the Trainer's own check, a device sync per
        # micro-step: ours is one per optimizer step.
        args.logging_nan_inf_filter = False

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any):
        running = getattr(self.trainer, "_tr_loss", None)
        if isinstance(running, torch.Tensor):
            value = running.item()  # one device sync per optimizer step
            if not math.isfinite(value):
                raise _diverged("training loss", value, state.global_step, args)
        scaler = getattr(getattr(self.trainer, "accelerator", None), "scaler", None)
        if scaler is not None:  # fp16: loss scaling
            scale = scaler.get_scale()
            if scale < MIN_LOSS_SCALE:
                raise TrainingDiverged(
                    f"the fp16 loss scale fell to {scale:.1e} at step {state.global_step}: the "
                    "gradients overflowed fp16 at nearly every step, so the optimizer skipped them "
                    f"(fp16 overflow: {_FP16_CAUSE}). {_fix(args)}"
                )

    def on_log(
        self,
        args: TrainingArguments,
        state: Any,
        control: Any,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        for key, what in (("loss", "training loss"), ("eval_loss", "evaluation loss")):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                raise _diverged(what, value, state.global_step, args)


_FP16_CAUSE = "Llama's activations can exceed 65,504, fp16's largest value"


def _fix(args: TrainingArguments) -> str:
    """The fix for a diverged run, and where its last checkpoint is."""
    if args.fp16:
        fix = (
            "Fix: lower learning_rate, or train where bf16 is native (a GPU of compute capability "
            "8.0+, such as an A100 or L4), whose range is fp32's"
        )
    else:
        fix = "Fix: lower learning_rate, and check that the class weights and inputs are finite"
    checkpoint = last_checkpoint(args.output_dir)
    where = f"the last checkpoint is {checkpoint}" if checkpoint else "no checkpoint was saved"
    return f"{fix}; {where}"


def _diverged(what: str, value: float, step: int, args: TrainingArguments) -> TrainingDiverged:
    """The error for a loss that became ``value`` (NaN or inf) at ``step``: one line."""
    cause = f"most likely an fp16 overflow ({_FP16_CAUSE})" if args.fp16 else "training diverged"
    return TrainingDiverged(
        f"the {what} became {value} at step {step}: a non-finite loss, {cause}. {_fix(args)}"
    )


class WeightedLossTrainer(CourseTrainer):
    """A Trainer whose loss is cross-entropy weighted per class (rare classes count more)."""

    # our loss is a per-batch mean, so the Trainer must still divide it by the accumulation steps
    loss_is_scaled_for_ga = False

    def __init__(
        self, *args: Any, class_weights: torch.Tensor | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.class_weights = class_weights

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs.logits.float()  # (batch, num_labels)
        weight = None if self.class_weights is None else self.class_weights.to(logits.device)
        loss = torch.nn.functional.cross_entropy(logits, labels, weight=weight)
        return (loss, outputs) if return_outputs else loss


def compute_metrics(eval_pred: Any) -> dict[str, float]:
    """For ``Trainer(compute_metrics=...)``: metrics from (logits, labels)."""
    logits, labels = eval_pred
    logits = logits[0] if isinstance(logits, tuple) else logits
    return classification_metrics(np.asarray(labels), np.asarray(logits).argmax(axis=-1))


def training_arguments(
    config: CourseConfig, output_dir: str | Path, **overrides: Any
) -> TrainingArguments:
    """TrainingArguments for the course: length-grouped batches, seeded, eight evaluations per run,
    no Hub reporting. Notebook 06 writes the same arguments out in full (tests check)."""
    values: dict[str, Any] = {
        "output_dir": str(output_dir),
        "learning_rate": config.learning_rate,
        "weight_decay": config.weight_decay,
        "warmup_steps": config.warmup_ratio,  # a float below 1 is a ratio of the total steps
        "num_train_epochs": config.epochs,
        "per_device_train_batch_size": config.batch_size,
        "per_device_eval_batch_size": config.eval_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "lr_scheduler_type": "linear",
        # batches of similar length waste little compute on padding (transformers 5 name of
        # group_by_length)
        "train_sampling_strategy": "group_by_length",
        # eight validation points over the run (a float below 1 is a ratio of the total steps; the
        # last step is always evaluated), so the curve shows how accuracy grows, not a single dot
        "eval_strategy": "steps",
        "eval_steps": 0.125,
        # checkpoints (adapter, head, optimizer, RNG state) so an interrupted run can resume; the
        # last two kept
        "save_strategy": "steps",
        "save_steps": config.save_steps,
        "save_total_limit": 2,
        "logging_steps": config.logging_steps,
        "logging_first_step": True,
        "seed": config.seed,
        "data_seed": config.seed,
        "report_to": "none",
        "dataloader_num_workers": 0,
        "ddp_find_unused_parameters": False,  # every LoRA weight gets a gradient
        # on the CPU, `accelerate launch` trains several processes with DDP over gloo
        "use_cpu": device().value.type == "cpu",
        **mixed_precision().value,
    }
    values.update(overrides)
    return TrainingArguments(**values)


class RunFolderError(RuntimeError):
    """A run folder that cannot be used as asked; the message names the fix (--resume, --overwrite,
    a new folder)."""


def last_checkpoint(folder: str | Path) -> Path | None:
    """The newest *complete* ``checkpoint-N`` in ``folder`` (or None).

    The Trainer writes ``trainer_state.json`` last, so a checkpoint without it was cut off mid-save
    (a killed process) and is skipped with a warning; resuming from it would fail. Taught in
    notebook 06.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = sorted(
        (int(path.name.split("-")[1]), path)
        for path in folder.glob("checkpoint-*")
        if path.is_dir() and path.name.split("-")[1].isdigit()
    )
    for _, path in reversed(found):
        if (path / "trainer_state.json").is_file():
            return path
        warnings.warn(
            f"{path} is incomplete (the process stopped while saving it); using an earlier "
            "checkpoint.",
            stacklevel=2,
        )
    return None


def mean_training_loss(log_history: list[dict[str, Any]]) -> float:
    """Mean training loss over all steps, from the Trainer's log (which a resumed run restores in
    full).

    Each logged ``loss`` averages the steps since the previous log. ``train()``'s own
    ``training_loss`` counts only the steps of the current process, so it differs after
    ``--resume``.
    """
    total, previous = 0.0, 0
    for row in log_history:
        if "loss" in row and "step" in row:
            total += row["loss"] * (row["step"] - previous)
            previous = row["step"]
    if previous == 0:
        raise ValueError("The log holds no training loss: was the model trained?")
    return total / previous
