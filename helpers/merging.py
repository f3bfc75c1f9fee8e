"""Save the adapter with its labels, reload it into a fresh base, merge into a 16-bit base, and
check.

Taught in notebook 07 (evaluation and merging) and, for an instruction-tuned model, notebook 08;
used by ``helpers.train`` and ``helpers.predict``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from helpers.config import CourseConfig
from helpers.evaluation import predict_logits
from helpers.hardware import attention_implementation, device, merge_dtype, serving_dtype
from helpers.io import atomic_directory, atomic_write_json
from helpers.modeling import ModelError, is_4bit, load_for_task, load_tokenizer

LABELS_FILE = "course_labels.json"


def _write_labels(folder: Path, config: CourseConfig) -> None:
    atomic_write_json(
        folder / LABELS_FILE,
        {
            "base_model": config.model_name,
            "labels": list(config.labels),
            "id2label": {str(i): name for i, name in config.id2label.items()},
            "label2id": config.label2id,
            "max_length": config.max_length,
            "trained_in_4bit": config.load_in_4bit,
            # instruct: the model answers with a label's name, prompted as it was trained (notebook
            # 08)
            "task": config.task,
            "prompt_style": config.prompt_style,
            "max_new_tokens": config.max_new_tokens,
        },
    )


def read_labels(folder: str | Path) -> dict[str, Any]:
    """The labels and base model saved beside an adapter or merged model."""
    path = Path(folder) / LABELS_FILE
    if not path.is_file():
        raise ModelError(
            f"{folder} has no {LABELS_FILE}, so its label names are unknown. Save models with "
            "helpers.merging.save_adapter / merge_and_save, which write it."
        )
    return json.loads(path.read_text())


def save_adapter(model: Any, tokenizer: Any, config: CourseConfig, folder: str | Path) -> Path:
    """Save LoRA weights, the trained ``score`` head, the tokenizer and the labels (atomically)."""
    folder = Path(folder)
    with atomic_directory(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_labels(tmp, config)
    return folder


def _config_from_labels(meta: dict[str, Any]) -> CourseConfig:
    return CourseConfig(
        model_name=meta["base_model"],
        labels=list(meta["labels"]),
        max_length=meta["max_length"],
        load_in_4bit=meta.get("trained_in_4bit", True),
        task=meta.get("task", "classify"),
        prompt_style=meta.get("prompt_style", "alpaca"),
        max_new_tokens=meta.get("max_new_tokens", 8),
    )


def saved_config(folder: str | Path) -> CourseConfig:
    """The labels, task and prompt settings saved beside an adapter or merged model, as a config."""
    return _config_from_labels(read_labels(folder))


def load_adapter(
    folder: str | Path, load_in_4bit: bool = False, dtype: torch.dtype | None = None
) -> tuple[Any, Any]:
    """A fresh base model with the saved adapter on top. Returns (peft_model, tokenizer), in eval
    mode.

    ``load_in_4bit=True`` rebuilds the model exactly as it was trained (QLoRA). With ``False`` the
    base is in the merge dtype (``helpers.hardware.merge_dtype``), ready to merge: for an adapter
    trained on a 4-bit base that is the NF4 base *de-quantized*, the weights the adapter actually
    learned against. Reloading the original 16-bit weights instead (the usual recipe) shifts the
    predictions away from the trained model's.
    """
    from peft import PeftModel

    folder = Path(folder)
    config = _config_from_labels(read_labels(folder))
    head = _saved_head_rows(folder)
    if head is not None and head != config.num_labels:
        raise ModelError(
            f"The adapter in {folder} was trained for {head} labels but its label file lists "
            f"{config.num_labels}. Use the course_labels.json saved with that adapter."
        )
    if load_in_4bit or config.load_in_4bit:
        base, tokenizer = load_for_task(config, load_in_4bit=True, prepare_for_training=False)
        if not load_in_4bit:
            base = base.dequantize(dtype=dtype or merge_dtype().value)
    else:
        base, tokenizer = load_for_task(
            config, load_in_4bit=False, dtype=dtype, prepare_for_training=False
        )
    model = PeftModel.from_pretrained(base, folder)
    if not load_in_4bit:
        # peft keeps adapter weights in fp32: match the base
        model = model.to(dtype or merge_dtype().value)
    model.eval()
    return model, tokenizer


def _saved_head_rows(folder: Path) -> int | None:
    from safetensors import safe_open

    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        return None
    with safe_open(str(weights), framework="pt") as handle:
        for key in handle.keys():
            if key.endswith("score.weight"):
                return int(handle.get_slice(key).get_shape()[0])
    return None


def merge(model: Any) -> Any:
    """Fold the LoRA weights into the base weights. Refuses a 4-bit base: rounding would change the
    model."""
    if is_4bit(model):
        raise ModelError(
            "Refusing to merge into a 4-bit model: the merged weights would be re-quantized to NF4 "
            "and the predictions would change. Reload the adapter into a 16-bit base with "
            "load_adapter(folder, load_in_4bit=False), then merge."
        )
    return model.merge_and_unload()


def merge_and_save(
    adapter_folder: str | Path, merged_folder: str | Path, check_texts: Sequence[str] | None = None
) -> tuple[Any, Any, dict[str, Any] | None]:
    """Reload the adapter into a base in the merge dtype, merge, and save model + tokenizer +
    labels.

    With ``check_texts``, the adapter model and the merged model are compared on them (the same base
    precision): ``max_abs_difference`` of what they decide from (class logits, or label
    log-likelihoods for an instruction-tuned model), ``same_predictions`` (the share of equal
    predicted classes) and, for an instruction-tuned model, ``same_answers`` (the share of equal
    greedy answers). Returns (merged_model, tokenizer, check or None).
    """
    model, tokenizer = load_adapter(adapter_folder, load_in_4bit=False, dtype=merge_dtype().value)
    config = saved_config(adapter_folder)
    before = None if check_texts is None else _decisions(model, tokenizer, check_texts, config)
    merged = merge(model)
    check = None
    if before is not None:
        after = _decisions(merged, tokenizer, check_texts, config)
        check = {
            "rows": len(before[0]),
            "max_abs_difference": float(np.abs(after[0] - before[0]).max()),
            "same_predictions": float((after[0].argmax(1) == before[0].argmax(1)).mean()),
        }
        if config.task == "instruct":
            same = [a == b for a, b in zip(before[1], after[1], strict=True)]
            check["same_answers"] = sum(same) / len(same)
    save_merged(merged, tokenizer, adapter_folder, merged_folder)
    return merged, tokenizer, check


def _decisions(
    model: Any, tokenizer: Any, texts: Sequence[str], config: CourseConfig
) -> tuple[np.ndarray, list]:
    """What the merge check compares: class logits, or (instruct) label scores and answers."""
    if config.task == "instruct":
        from helpers.instruct import article_prompts, classify_prompts

        return classify_prompts(
            model,
            tokenizer,
            article_prompts(texts, config, tokenizer),
            config.labels,
            config.max_new_tokens,
            config.eval_batch_size,
            config.prompt_style,
        )
    return model_outputs(model, tokenizer, texts, config), []


def model_outputs(
    model: Any, tokenizer: Any, texts: Sequence[str], config: CourseConfig, batch_size: int = 32
) -> np.ndarray:
    """What a model decides from: class logits (classify) or label log-likelihoods (instruct), (n,
    labels)."""
    if config.task == "instruct":
        from helpers.instruct import article_prompts, label_log_likelihoods

        return label_log_likelihoods(
            model,
            tokenizer,
            article_prompts(texts, config, tokenizer),
            config.labels,
            batch_size,
            config.prompt_style,
        )
    return predict_logits(model, tokenizer, texts, batch_size, config.max_length, progress=False)


def save_merged(
    merged: Any, tokenizer: Any, adapter_folder: str | Path, merged_folder: str | Path
) -> Path:
    """Save a merged model with its tokenizer and the adapter's labels (atomically)."""
    meta = read_labels(adapter_folder)
    with atomic_directory(merged_folder) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_labels(tmp, _config_from_labels(meta))
    return Path(merged_folder)


def load_for_inference(
    folder: str | Path, dtype: torch.dtype | None = None
) -> tuple[Any, Any, dict[int, str]]:
    """A merged model folder or an adapter folder, ready to predict. Returns (model, tokenizer,
    id2label).

    ``dtype`` defaults to the hardware's serving dtype (``helpers.hardware.serving_dtype``); pass
    ``torch.float32`` to check a merge exactly.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(
            f"Model folder {folder} does not exist. Pass the merged/ or adapter/ folder of a run."
        )
    meta = read_labels(folder)
    id2label = {int(i): name for i, name in meta["id2label"].items()}
    dtype = dtype or serving_dtype().value
    if (folder / "adapter_config.json").is_file():
        model, tokenizer = load_adapter(folder, load_in_4bit=False, dtype=dtype)
    elif (folder / "config.json").is_file():
        tokenizer = load_tokenizer(str(folder))
        auto_class = (
            AutoModelForCausalLM
            if meta.get("task") == "instruct"
            else AutoModelForSequenceClassification
        )
        model = auto_class.from_pretrained(
            folder, dtype=dtype, attn_implementation=attention_implementation().value
        )
        model.to(device().value)
    else:
        raise ModelError(
            f"{folder} is neither a merged model (config.json) nor an adapter "
            "(adapter_config.json). Pass the merged/ or adapter/ folder of a run."
        )
    model.eval()
    return model, tokenizer, id2label
