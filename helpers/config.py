"""Every setting of the course in one dataclass, and the profiles that fill it in.

Taught in notebook 00 (setup) and used by every notebook and by ``python -m helpers.train``.

A profile is one ``Profile`` entry in ``PROFILES``: its model, whether the Hub needs a login, its
split sizes, what instruction tuning changes and the benchmark's sizes. Adding a profile is adding
an entry; notebooks, commands and help texts read the profiles from there.

The profile is picked by an explicit argument, by ``profile:`` in a YAML file, by the environment
variable ``COURSE_PROFILE``, or else from the hardware (the first GPU profile where a GPU is
usable).
"""

from __future__ import annotations

import contextlib
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
    """Every setting of a run; a profile fills in its own values (``Profile.config``).

    Change settings with a YAML file, the parameters cell of a notebook or ``config.replace(...)``.
    """

    # --- profile and model ---
    profile: str = "smollm2-cpu"
    model_name: str = "smollm2"  # "smollm2" (bundled), a Hub id or a local folder
    # --- data ---
    data_source: str = "local"  # "local" (data/ folder) or "hub" (fancyzhx/ag_news, else local)
    labels: list[str] = field(default_factory=lambda: list(AG_NEWS_LABELS))
    train_per_class: int = 200
    val_per_class: int = 25
    test_per_class: int = 100
    max_length: int = 96
    # --- attention kernel: "auto" (helpers.hardware decides), "sdpa" or "eager" ---
    attn_implementation: str = "auto"
    # --- quantization ---
    load_in_4bit: bool = True
    # --- LoRA ---
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = (
        0.0  # dropout copies every LoRA input each step: slower, and no more accurate here
    )
    lora_target_modules: list[str] | str = "all-linear"
    # --- optimizer and schedule ---
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    epochs: float = 1.0
    batch_size: int = 8
    eval_batch_size: int = 32
    gradient_accumulation_steps: int = 1
    # recompute activations in the backward pass: True, False, or "auto" (only where the run would
    # not fit without it: helpers.memory.gradient_checkpointing decides)
    gradient_checkpointing: bool | str = "auto"
    use_class_weights: bool = True
    # --- task: a classification head (notebooks 03-07) or instruction tuning (notebook 08) ---
    task: str = "classify"  # "classify" or "instruct" (answer with the label's name)
    prompt_style: str = (
        "alpaca"  # instruct: "alpaca" template, or "chat" (the model's own chat template)
    )
    instruct_train_per_class: int = 0  # instruct: the first N rows per class of the split (0: all)
    alpaca_general_rows: int = (
        0  # instruct: general Alpaca records (yahma/alpaca-cleaned); Hub only
    )
    max_new_tokens: int = 8  # instruct: tokens generated per answer (labels: 1-3 tokens, then EOS)
    # --- bookkeeping ---
    seed: int = 42
    logging_steps: int = 5
    save_steps: int = 25  # a checkpoint every N optimizer steps, for `--resume` after a disconnect

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
        """A copy with some fields changed; unknown names raise a ConfigError listing the valid
        ones."""
        _check_keys(changes)
        return _check_values(dataclasses.replace(self, **changes))


CHOICES = {
    "task": ("classify", "instruct"),
    "prompt_style": ("alpaca", "chat"),
    "attn_implementation": ("auto", "sdpa", "eager"),
    "gradient_checkpointing": (True, False, "auto"),
}


CHOICES["data_source"] = ("local", "hub")

# the smallest value each number may take (inclusive), and for some the value it must stay below
AT_LEAST: dict[str, float] = {
    "train_per_class": 1,
    "val_per_class": 1,
    "test_per_class": 1,
    "max_length": 8,
    "lora_r": 1,
    "lora_alpha": 1e-9,
    "lora_dropout": 0,
    "learning_rate": 1e-12,
    "weight_decay": 0,
    "warmup_ratio": 0,
    "epochs": 1e-9,
    "batch_size": 1,
    "eval_batch_size": 1,
    "gradient_accumulation_steps": 1,
    "instruct_train_per_class": 0,
    "alpaca_general_rows": 0,
    "max_new_tokens": 1,
    "seed": 0,
    "logging_steps": 1,
    "save_steps": 1,
}
BELOW: dict[str, float] = {"lora_dropout": 1, "warmup_ratio": 1, "learning_rate": 1}
FIX = "Fix it in your YAML file, parameters cell or command line."


def _typed(name: str, value: Any, kind: str) -> Any:
    """``value`` as the field's type, or a ConfigError. YAML 1.1 reads ``1e-3`` (no dot) as a
    string: a string that is a number is taken as that number."""
    if kind in ("int", "float") and isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value.strip()) if kind == "float" else int(value.strip())
    if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    expected = {"int": int, "float": float, "bool": bool, "str": str}.get(kind)
    wrong_bool = isinstance(value, bool) and kind in ("int", "float")
    if expected is not None and (not isinstance(value, expected) or wrong_bool):
        words = {"int": "a whole number", "float": "a number", "bool": "true or false"}
        raise ConfigError(
            f"{name}={value!r} must be {words.get(kind, 'a string')}, not "
            f"{type(value).__name__}. {FIX}"
        )
    return value


def _check_values(config: CourseConfig) -> CourseConfig:
    """Types, ranges and choices of every setting, before any data or model is touched."""
    changes: dict[str, Any] = {}
    for item in fields(CourseConfig):
        value = _typed(item.name, getattr(config, item.name), str(item.type))
        if value is not getattr(config, item.name):
            changes[item.name] = value
        low, high = AT_LEAST.get(item.name), BELOW.get(item.name)
        if low is not None and value < low or high is not None and value >= high:
            start = "above 0" if 0 < low < 1e-6 else f"at least {low:g}"
            span = start if high is None else f"{start} and below {high:g}"
            raise ConfigError(f"{item.name}={value!r} is out of range: it must be {span}. {FIX}")
    config = dataclasses.replace(config, **changes) if changes else config
    for name, allowed in CHOICES.items():
        value = getattr(config, name)
        # `1 == True`: a choice must also have the allowed value's type
        if not any(value == a and type(value) is type(a) for a in allowed):
            raise ConfigError(f"{name}={value!r} is not one of {list(allowed)}. {FIX}")
    labels, targets = config.labels, config.lora_target_modules
    if (
        not isinstance(labels, list)
        or len(labels) < 2
        or len(set(labels)) != len(labels)
        or not all(isinstance(x, str) and x.strip() for x in labels)
    ):
        raise ConfigError(f"labels={labels!r} must be a list of two or more distinct names. {FIX}")
    if not (isinstance(targets, str) and targets) and not (
        isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)
    ):
        raise ConfigError(
            f"lora_target_modules={targets!r} must be 'all-linear' or a list of module names, "
            f"such as [q_proj, v_proj]. {FIX}"
        )
    return config


@dataclass(frozen=True)
class Profile:
    """Everything that differs between profiles. Settings not named here keep CourseConfig's
    defaults."""

    name: str
    description: str
    model_name: str  # "smollm2" (bundled), a Hub id or a local folder
    train_per_class: int
    val_per_class: int
    test_per_class: int
    needs_hub_login: bool = False  # a gated model: notebook 00 asks for a token
    for_gpu: bool = False  # the default profile where a GPU is usable
    settings: dict[str, Any] = field(default_factory=dict)  # other CourseConfig values
    instruct: dict[str, Any] = field(default_factory=dict)  # what `task: instruct` changes
    bench_sizes: tuple[int, int] = (64, 50)  # benchmark rows per class: (train, test)
    learns: bool = True  # False: random weights and a few rows, whose accuracy means nothing

    def config(self, task: str = "classify") -> CourseConfig:
        """This profile's CourseConfig for ``task``."""
        values = {
            "profile": self.name,
            "model_name": self.model_name,
            "train_per_class": self.train_per_class,
            "val_per_class": self.val_per_class,
            "test_per_class": self.test_per_class,
            **self.settings,
        }
        if task == "instruct":
            values.update(task="instruct", **self.instruct)
        _check_keys(values)
        return _check_values(CourseConfig(**values))


# the llama3-8b profile's settings, shared by llama3-tiny so that CI runs the same code path
LLAMA3_SETTINGS: dict[str, Any] = {
    "max_length": 128,
    "learning_rate": 1e-4,
    "eval_batch_size": 64,
    "logging_steps": 25,
    "save_steps": 200,
}

# what instruction tuning changes on llama3-8b, shared by llama3-tiny (the simulated T4 runs it).
# Within a T4 (helpers.memory): label scoring keeps each prompt's key-value cache, in fp32 after
# training, once per label, so 8 prompts a batch; general Alpaca answers put up to ~490 tokens a
# row through the 128k-word head, whose 16-bit copy of the fp32 weights autocast keeps for the
# backward pass, so 2 rows a step, four times (the same 8 rows an update)
LLAMA3_INSTRUCT: dict[str, Any] = {
    "eval_batch_size": 8,
    "batch_size": 2,
    "gradient_accumulation_steps": 4,
}

PROFILES: dict[str, Profile] = {
    profile.name: profile
    for profile in (
        Profile(
            name="smollm2-cpu",
            description="SmolLM2-135M-Instruct (Llama architecture), bundled: offline, on a CPU",
            model_name="smollm2",
            train_per_class=200,
            val_per_class=25,
            test_per_class=100,
            # instruct prompts are about twice as long as the head's inputs: a quarter of the rows
            instruct={"instruct_train_per_class": 50},
            bench_sizes=(64, 50),
        ),
        Profile(
            name="llama3-8b",
            description="Meta-Llama-3-8B from the Hugging Face Hub, 4-bit QLoRA, on a GPU",
            model_name="meta-llama/Meta-Llama-3-8B",
            needs_hub_login=True,
            for_gpu=True,
            train_per_class=2000,
            val_per_class=250,
            test_per_class=500,
            settings={"data_source": "hub", **LLAMA3_SETTINGS},
            instruct={"alpaca_general_rows": 1000, **LLAMA3_INSTRUCT},
            bench_sizes=(500, 250),
        ),
        Profile(
            name="llama3-tiny",
            description="Llama 3 8B's code path in miniature (Meta's tokenizer, random 2-layer "
            "model): tests, CI",
            model_name="llama3-tiny",
            train_per_class=8,
            val_per_class=2,
            test_per_class=4,
            settings={**LLAMA3_SETTINGS, "logging_steps": 1},
            instruct=LLAMA3_INSTRUCT,
            bench_sizes=(8, 4),
            learns=False,
        ),
    )
}


def learns(config: CourseConfig) -> bool:
    """Whether ``config``'s profile trains a model whose accuracy means something (llama3-tiny's
    random two layers only run the code path)."""
    return PROFILES[config.profile].learns


def profile_names() -> str:
    """The profiles' names for help texts: ``smollm2-cpu, llama3-8b``."""
    return ", ".join(PROFILES)


def _check_keys(values: dict[str, Any]) -> None:
    valid = {f.name for f in fields(CourseConfig)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ConfigError(
            f"Unknown config setting(s) {unknown}. Valid settings are: {sorted(valid)}. Fix the "
            "spelling in your YAML file or parameters cell."
        )


def default_profile() -> str:
    """``COURSE_PROFILE`` if set, else the first GPU profile where a GPU is usable, else the first
    CPU one."""
    env = os.environ.get(PROFILE_ENV_VAR)
    if env:
        return env
    from helpers.hardware import check_gpu_usable, gpu_available

    check_gpu_usable()  # an NVIDIA GPU torch cannot use is an error, not a silent CPU run
    gpu = gpu_available()
    return next((p.name for p in PROFILES.values() if p.for_gpu == gpu), next(iter(PROFILES)))


def load_config(
    profile: str | None = None, yaml_path: str | Path | None = None, **overrides: Any
) -> CourseConfig:
    """Resolve a config: the profile (argument, YAML ``profile:``, env var or hardware), then the
    YAML file's values, then ``overrides``."""
    from_yaml: dict[str, Any] = {}
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise ConfigError(
                f"Config file {path} does not exist. Pass the path of a YAML file, or omit it."
            )
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"Config file {path} must hold a mapping of setting: value, "
                f"not {type(loaded).__name__}."
            )
        from_yaml = loaded
    name = profile or from_yaml.get("profile") or default_profile()
    if name not in PROFILES:
        raise ConfigError(
            f"Unknown profile {name!r}. Choose one of {sorted(PROFILES)} "
            f"(argument, YAML or ${PROFILE_ENV_VAR})."
        )
    values = {**from_yaml, **overrides, "profile": name}
    _check_keys(values)
    base = PROFILES[name].config(task=values.get("task", "classify"))
    return _check_values(dataclasses.replace(base, **values))


def save_config(config: CourseConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically), so that every run folder says how it was
    made."""
    path = Path(path)
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
    return path
