"""The class-weighted Trainer, the metrics and the training arguments.

Taught in notebook 06 (training); used by ``helpers.train``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Trainer, TrainingArguments

from helpers.config import CourseConfig
from helpers.evaluation import classification_metrics
from helpers.hardware import device, mixed_precision


class CourseTrainer(Trainer):
    """The Trainer, leaving the model as it found it: in its own precision once ``train()`` returns.

    Under bf16/fp16 mixed precision, accelerate wraps ``model.forward`` in autocast and the Trainer
    leaves the wrapper on, so anything run with the model after training (an evaluation, generation)
    would run in 16-bit while the saved adapter, reloaded, runs in the model's precision. Base of
    ``WeightedLossTrainer`` (``helpers.train``) and ``ResponseLossTrainer`` (notebook 08).
    """

    def train(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().train(*args, **kwargs)
        finally:
            # drops the autocast wrapper
            self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)


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
