"""One dataclass holding every setting of the course, and its two profiles.

Taught in notebook 00 (setup) and used by every notebook and by ``python -m helpers.train``.

Profiles:

* ``llama3-8b``: Meta-Llama-3-8B from the Hugging Face Hub, 4-bit QLoRA, for a GPU.
* ``smollm2-cpu``: the bundled SmolLM2-135M-Instruct (Llama architecture), offline, 2 CPU cores.

The default profile is picked from the hardware (CUDA present: ``llama3-8b``), overridden by the
environment variable ``COURSE_PROFILE``, by an explicit argument, or by ``profile:`` in a YAML file.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from helpers.io import atomic_write_text

AG_NEWS_LABELS: list[str] = ["World", "Sports", "Business", "Sci/Tech"]
PROFILE_ENV_VAR = "COURSE_PROFILE"


class ConfigError(ValueError):
    """A bad setting; the message names it and the fix."""


@dataclass
class CourseConfig:
    """Every setting of a run. Change a profile by editing a copy, a YAML file or the parameters cell."""

    # --- profile and model ---
    profile: str = "smollm2-cpu"
    model_name: str = "smollm2"  # "smollm2" (bundled), a Hub id or a local folder
    # --- data ---
    data_source: str = "local"  # "local" (data/ folder) or "hub" (fancyzhx/ag_news, falls back to local)
    labels: list[str] = field(default_factory=lambda: list(AG_NEWS_LABELS))
    train_per_class: int = 200
    val_per_class: int = 25
    test_per_class: int = 100
    max_length: int = 96
    # --- attention kernel: "auto" (sdpa on a GPU, eager on the CPU: faster for short rows), "sdpa" or "eager" ---
    attn_implementation: str = "auto"
    # --- quantization ---
    load_in_4bit: bool = True
    # --- LoRA ---
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.0  # no dropout: a copy of every LoRA input per step; measured 20% faster on 2 cores, same accuracy
    lora_target_modules: list[str] | str = "all-linear"
    # --- optimizer and schedule ---
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    epochs: float = 1.0
    batch_size: int = 8
    eval_batch_size: int = 32
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    use_class_weights: bool = True
    # --- task: a classification head (notebooks 03-07) or instruction tuning (notebook 08) ---
    task: str = "classify"  # "classify" or "instruct" (answer with the label's name)
    prompt_style: str = "alpaca"  # instruct: "alpaca" template, or "chat" (the model's own chat template)
    instruct_train_per_class: int = 0  # instruct: train on the first N rows per class of the same split (0: all)
    alpaca_general_rows: int = 0  # instruct: general Alpaca records (yahma/alpaca-cleaned) mixed in; Hub only
    max_new_tokens: int = 8  # instruct: tokens generated per answer (labels are 1-3 tokens, then EOS)
    # --- bookkeeping ---
    seed: int = 42
    logging_steps: int = 5
    save_steps: int = 25  # a checkpoint every N optimizer steps, for `--resume` after a crash or disconnect

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.labels)}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "CourseConfig":
        """A copy with some fields changed; unknown names raise a ConfigError listing the valid ones."""
        _check_keys(changes)
        return _check_values(dataclasses.replace(self, **changes))


CHOICES = {"task": ("classify", "instruct"), "prompt_style": ("alpaca", "chat"),
           "attn_implementation": ("auto", "sdpa", "eager")}


def _check_values(config: CourseConfig) -> CourseConfig:
    for name, allowed in CHOICES.items():
        if getattr(config, name) not in allowed:
            raise ConfigError(f"{name}={getattr(config, name)!r} is not one of {list(allowed)}. Fix it in your YAML "
                              "file, parameters cell or command line.")
    return config


PROFILES: dict[str, CourseConfig] = {
    "smollm2-cpu": CourseConfig(),
    "llama3-8b": CourseConfig(
        profile="llama3-8b",
        model_name="meta-llama/Meta-Llama-3-8B",
        data_source="hub",
        train_per_class=2000,
        val_per_class=250,
        test_per_class=500,
        max_length=128,
        lora_r=16,
        lora_alpha=16,
        lora_target_modules="all-linear",
        learning_rate=1e-4,
        batch_size=8,
        eval_batch_size=64,
        gradient_checkpointing=True,
        logging_steps=25,
        save_steps=200,
    ),
}

# what `task: instruct` changes in each profile (notebook 08, `python -m helpers.train --task instruct`)
INSTRUCT_CHANGES: dict[str, dict[str, Any]] = {
    # prompts are about twice as long as the head's inputs: a quarter of the training rows keeps 2 cores in minutes
    "smollm2-cpu": {"instruct_train_per_class": 50},
    "llama3-8b": {"alpaca_general_rows": 1000},
}


def _check_keys(values: dict[str, Any]) -> None:
    valid = {f.name for f in fields(CourseConfig)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ConfigError(
            f"Unknown config setting(s) {unknown}. Valid settings are: {sorted(valid)}. Fix the spelling in your "
            "YAML file or parameters cell."
        )


def default_profile() -> str:
    """``COURSE_PROFILE`` if set, else ``llama3-8b`` where CUDA is present, else ``smollm2-cpu``."""
    env = os.environ.get(PROFILE_ENV_VAR)
    if env:
        return env
    import torch

    return "llama3-8b" if torch.cuda.is_available() else "smollm2-cpu"


def load_config(profile: str | None = None, yaml_path: str | Path | None = None, **overrides: Any) -> CourseConfig:
    """Resolve a config: profile (argument, YAML ``profile:``, env var or hardware), then YAML values, then overrides."""
    from_yaml: dict[str, Any] = {}
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise ConfigError(f"Config file {path} does not exist. Pass the path of a YAML file, or omit it.")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"Config file {path} must hold a mapping of setting: value, not {type(loaded).__name__}.")
        from_yaml = loaded
    name = profile or from_yaml.get("profile") or default_profile()
    if name not in PROFILES:
        raise ConfigError(f"Unknown profile {name!r}. Choose one of {sorted(PROFILES)} (argument, YAML or ${PROFILE_ENV_VAR}).")
    values = {**from_yaml, **overrides, "profile": name}
    _check_keys(values)
    base = PROFILES[name]
    if values.get("task") == "instruct":
        base = dataclasses.replace(base, task="instruct", **INSTRUCT_CHANGES.get(name, {}))
    return _check_values(dataclasses.replace(base, **values))


def save_config(config: CourseConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically), so that every run folder says how it was made."""
    path = Path(path)
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
    return path
