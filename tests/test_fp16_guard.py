"""A run whose loss turns NaN/inf, or whose fp16 loss scale collapses, stops with TrainingDiverged
before it saves the broken step: provoked for real on a tiny Llama on the CPU, and the fp16 scaler
path with a stub scaler (no GPU here)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification, Trainer

from helpers.config import ConfigError, load_config
from helpers.training import (
    MIN_LOSS_SCALE,
    StopOnNonFiniteLoss,
    TrainingDiverged,
    WeightedLossTrainer,
    training_arguments,
)

ROWS = 8


def tiny_llama() -> LlamaForSequenceClassification:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_labels=4,
        pad_token_id=0,
    )
    return LlamaForSequenceClassification(config)


def rows() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        {
            "input_ids": torch.randint(1, 100, (6,), generator=generator),
            "attention_mask": torch.ones(6, dtype=torch.long),
            "labels": torch.tensor(i % 4),
        }
        for i in range(ROWS)
    ]


def args_for(out, **overrides):
    """The course's arguments on the CPU in fp32, a checkpoint every step, a constant rate."""
    values = {
        "use_cpu": True,
        "bf16": False,
        "fp16": False,
        "per_device_train_batch_size": 2,
        "max_steps": ROWS // 2,
        "eval_strategy": "no",
        "save_steps": 1,
        "save_total_limit": None,
        "warmup_steps": 0,
        "lr_scheduler_type": "constant",
        "train_sampling_strategy": "sequential",
        **overrides,
    }
    return training_arguments(load_config("llama3-tiny"), out, **values)


def saved_steps(out) -> list[int]:
    return sorted(int(path.name.split("-")[1]) for path in out.glob("checkpoint-*"))


def test_training_diverged_is_a_config_error():
    # helpers.train's command prints a ConfigError as one line "error: ..." with exit code 2
    assert issubclass(TrainingDiverged, ConfigError)


def test_a_huge_learning_rate_stops_at_the_first_nan_step_before_it_is_saved(tmp_path):
    # after one Adam step of 1e30 the weights are ~1e30 and the next forward overflows fp32. The
    # loss is logged every 10 steps only: the guard must not wait for the log.
    out = tmp_path / "checkpoints"
    trainer = WeightedLossTrainer(
        model=tiny_llama(),
        args=args_for(out, learning_rate=1e30, logging_steps=10),
        train_dataset=rows(),
    )
    with pytest.raises(TrainingDiverged) as raised:
        trainer.train()
    message = str(raised.value)
    step = trainer.state.global_step
    assert step == 2  # step 1 ran on the initial weights
    assert "\n" not in message
    assert message.startswith(f"the training loss became nan at step {step}: a non-finite loss")
    assert "Fix: lower learning_rate" in message and "fp16" not in message  # fp32 on the CPU
    assert f"the last checkpoint is {out / f'checkpoint-{step - 1}'}" in message
    assert saved_steps(out) == [1]  # nothing saved at or after the step that diverged


def test_an_infinite_class_weight_stops_at_step_one_with_nothing_saved(tmp_path):
    out = tmp_path / "checkpoints"
    trainer = WeightedLossTrainer(
        model=tiny_llama(),
        args=args_for(out, learning_rate=1e-3, logging_steps=1),
        train_dataset=rows(),
        class_weights=torch.tensor([math.inf, 1.0, 1.0, 1.0]),
    )
    with pytest.raises(TrainingDiverged, match=r"^the training loss became nan at step 1: ") as e:
        trainer.train()
    assert str(e.value).endswith("no checkpoint was saved") and "\n" not in str(e.value)
    assert saved_steps(out) == []


def test_any_trainer_with_the_callback_sees_the_nan_in_its_log(tmp_path):
    # without a trainer handle the callback has only on_log; it turns the Trainer's NaN filter off
    # (which would log the running mean instead), so the logged loss is the NaN
    out = tmp_path / "checkpoints"
    args = args_for(out, learning_rate=1e30, logging_steps=1)
    assert args.logging_nan_inf_filter  # the Trainer's default
    trainer = Trainer(
        model=tiny_llama(), args=args, train_dataset=rows(), callbacks=[StopOnNonFiniteLoss()]
    )
    with pytest.raises(TrainingDiverged, match="the training loss became nan at step 2"):
        trainer.train()
    assert saved_steps(out) == [1]


def test_every_course_trainer_has_one_guard_that_knows_it(tmp_path):
    args = args_for(tmp_path)
    trainer = WeightedLossTrainer(model=tiny_llama(), args=args, train_dataset=rows())
    guards = [c for c in trainer.callback_handler.callbacks if isinstance(c, StopOnNonFiniteLoss)]
    assert len(guards) == 1 and guards[0].trainer is trainer
    given = StopOnNonFiniteLoss()
    trainer = WeightedLossTrainer(
        model=tiny_llama(), args=args, train_dataset=rows(), callbacks=[given]
    )
    guards = [c for c in trainer.callback_handler.callbacks if isinstance(c, StopOnNonFiniteLoss)]
    assert guards == [given] and given.trainer is trainer


def stub(scale: float | None, tmp_path, fp16: bool = True):
    """A trainer whose accelerator has a gradient scaler at ``scale`` (None: no scaler), its
    arguments and state: what the callback reads."""
    scaler = None if scale is None else SimpleNamespace(get_scale=lambda: scale)
    trainer = SimpleNamespace(accelerator=SimpleNamespace(scaler=scaler))
    args = SimpleNamespace(fp16=fp16, output_dir=str(tmp_path))
    return StopOnNonFiniteLoss(trainer), args, SimpleNamespace(global_step=40)


def test_a_collapsed_fp16_loss_scale_stops_the_run(tmp_path):
    guard, args, state = stub(1e-6, tmp_path)
    with pytest.raises(TrainingDiverged) as raised:
        guard.on_step_end(args, state, None)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("the fp16 loss scale fell to 1.0e-06 at step 40")
    assert "fp16 overflow" in message and "65,504" in message
    assert "Fix: lower learning_rate, or train where bf16 is native" in message
    assert "compute capability 8.0+" in message and message.endswith("no checkpoint was saved")


@pytest.mark.parametrize("scale", [None, 65536.0, 1.0, MIN_LOSS_SCALE])
def test_a_healthy_or_absent_loss_scale_is_left_alone(scale, tmp_path):
    guard, args, state = stub(scale, tmp_path)
    assert guard.on_step_end(args, state, None) is None


def test_fp16_is_named_as_the_cause_only_in_fp16(tmp_path):
    for fp16 in (True, False):
        guard, args, state = stub(None, tmp_path, fp16=fp16)
        with pytest.raises(TrainingDiverged) as raised:
            guard.on_log(args, state, None, logs={"eval_loss": math.inf})
        message = str(raised.value)
        assert message.startswith("the evaluation loss became inf at step 40: a non-finite loss")
        assert ("most likely an fp16 overflow" in message) == fp16
        assert ("fp16" in message) == fp16
    guard.on_log(args, state, None, logs={"loss": 0.5, "eval_loss": 0.7, "learning_rate": 1e-4})
