"""Save the adapter with its labels, reload it into a fresh base, merge into a 16-bit base, and
check.

Taught in notebook 07 (evaluation and merging) and, for an instruction-tuned model, notebook 08;
used by ``helpers.train`` and ``helpers.predict``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import release_memory

from helpers.config import CourseConfig
from helpers.evaluation import predict_logits
from helpers.hardware import (
    attention_implementation,
    device_map,
    gpu_memory,
    merge_dtype,
    serving_dtype,
    simulated_runtime,
)
from helpers.io import atomic_directory, atomic_write_json
from helpers.memory import parameter_counts, runtime_shape
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
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelError(
            f"{path} is damaged ({error}). Copy the folder again from its run, or retrain."
        ) from None
    labels = meta.get("labels") if isinstance(meta, dict) else None
    if (
        not isinstance(labels, list)
        or len(labels) < 2
        or not all(isinstance(x, str) for x in labels)
        or meta.get("id2label", {str(i): x for i, x in enumerate(labels)})
        != {str(i): x for i, x in enumerate(labels)}
    ):
        raise ModelError(
            f"{path} does not list the labels as the course writes them (labels, and id2label "
            "in the same order). Copy the folder again from its run, or retrain."
        )
    return meta


def save_adapter(model: Any, tokenizer: Any, config: CourseConfig, folder: str | Path) -> Path:
    """Save LoRA weights, the trained ``score`` head, the tokenizer and the labels (atomically)."""
    folder = Path(folder)
    with atomic_directory(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_labels(tmp, config)
        # the base as learners name it (a Hub id, or the course's "smollm2"), not a local path
        adapter_config = json.loads((tmp / "adapter_config.json").read_text())
        adapter_config["base_model_name_or_path"] = config.model_name
        atomic_write_json(tmp / "adapter_config.json", adapter_config)
    return folder


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:300]


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


# ---------------------------------------------------------------- the streamed merge
SHARD_BYTES = 2 * 10**9  # the largest merged shard held in RAM at once (Colab has 12.7 GB)


class _ShardWriter:
    """Collects merged tensors on the CPU and writes a safetensors shard whenever ``limit`` bytes
    are held, so RAM never holds more than about one shard of the merged model."""

    def __init__(self, folder: Path, limit: int) -> None:
        self.folder, self.limit = folder, limit
        self.pending: dict[str, torch.Tensor] = {}
        self.held = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu").contiguous()
        self.pending[name] = tensor
        self.held += tensor.nbytes
        self.total += tensor.nbytes
        if self.held >= self.limit:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        name = f"part-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, str(self.folder / name), metadata={"format": "pt"})
        self.files.append((name, list(self.pending)))
        self.pending, self.held = {}, 0

    def finish(self) -> list[str]:
        """Name the shards as transformers expects (one file, or an index and numbered parts)."""
        self.flush()
        if len(self.files) == 1:
            (self.folder / self.files[0][0]).rename(self.folder / "model.safetensors")
            return ["model.safetensors"]
        weight_map, names = {}, []
        for number, (part, keys) in enumerate(self.files, start=1):
            final = f"model-{number:05d}-of-{len(self.files):05d}.safetensors"
            (self.folder / part).rename(self.folder / final)
            weight_map.update(dict.fromkeys(keys, final))
            names.append(final)
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        atomic_write_json(self.folder / "model.safetensors.index.json", index)
        return names


def stream_merge(
    model: Any,
    tokenizer: Any,
    adapter_folder: str | Path,
    merged_folder: str | Path,
    dtype: torch.dtype | None = None,
    shard_bytes: int = SHARD_BYTES,
) -> Path:
    """Merge a LoRA model layer by layer into a folder of ``dtype`` shards of at most about
    ``shard_bytes``.

    ``model`` is the adapter on the base it was trained on (``load_adapter(folder,
    load_in_4bit=True)``). Each 4-bit weight is de-quantized on its own device, its LoRA update
    added in fp32 (W' = W + (alpha/r)·B·A) and the result rounded once to ``dtype`` and moved to the
    CPU.
    The 16-bit model never exists whole: peak GPU memory is the 4-bit model plus one layer, peak RAM
    about one shard. The folder loads with plain ``from_pretrained`` (no peft, no bitsandbytes).
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils.integrations import dequantize_bnb_weight
    from peft.utils.other import ModulesToSaveWrapper

    dtype = dtype or merge_dtype().value
    base = model.get_base_model()
    written: set[int] = set()  # tied weights (embeddings and lm_head) are written once
    with atomic_directory(Path(merged_folder)) as tmp:
        shards = _ShardWriter(tmp, shard_bytes)
        skip: tuple[str, ...] = ()
        for name, module in base.named_modules():
            if skip and name.startswith(skip):
                continue
            prefix = f"{name}." if name else ""
            if isinstance(module, LoraLayer):
                layer = module.get_base_layer()
                weight = layer.weight
                full = (
                    dequantize_bnb_weight(weight, getattr(weight, "quant_state", None))
                    if weight.__class__.__name__ in ("Params4bit", "Int8Params")
                    else weight.data
                ).float()
                for adapter in module.active_adapters:
                    full += module.get_delta_weight(adapter).float().to(full.device)
                shards.add(f"{prefix}weight", full.to(dtype))
                del full
                if getattr(layer, "bias", None) is not None:
                    shards.add(f"{prefix}bias", layer.bias.to(dtype))
                skip = (prefix,)
                continue
            if isinstance(module, ModulesToSaveWrapper):
                trained = module.modules_to_save[module.active_adapters[0]]
                for key, tensor in trained.state_dict().items():
                    shards.add(f"{prefix}{key}", tensor.to(dtype))
                skip = (prefix,)
                continue
            persistent = {
                key: buffer
                for key, buffer in module._buffers.items()
                if buffer is not None and key not in module._non_persistent_buffers_set
            }
            for key, tensor in {**module._parameters, **persistent}.items():
                if tensor is None or id(tensor) in written:
                    continue
                written.add(id(tensor))
                if tensor.__class__.__name__ == "Params4bit":
                    tensor = dequantize_bnb_weight(tensor, tensor.quant_state)
                cast = tensor.to(dtype) if tensor.is_floating_point() else tensor
                shards.add(f"{prefix}{key}", cast)
        shards.finish()
        config = copy.deepcopy(base.config)
        for key in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(config, key):
                delattr(config, key)
        config.dtype = dtype
        config.use_cache = True  # training with gradient checkpointing switched it off
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_labels(tmp, _config_from_labels(read_labels(adapter_folder)))
    return Path(merged_folder)


# The largest difference a merge may make to what the model decides from, by the merged model's
# dtype: rounding W + (alpha/r)·B·A once to 16 bits moves class logits by a few hundredths and label
# scores (sums of log-probabilities) by a few tenths (docs/decisions.md has the measured figures).
MERGE_TOLERANCE = {
    "classify": {torch.float32: 1e-3, torch.float16: 0.1, torch.bfloat16: 0.5},
    "instruct": {torch.float32: 1e-3, torch.float16: 0.5, torch.bfloat16: 1.0},
}
MERGE_AGREEMENT = 0.995  # the share of rows whose predicted class must not change


def merge_check(
    before: tuple[np.ndarray, list], after: tuple[np.ndarray, list], dtype: torch.dtype, task: str
) -> dict[str, Any]:
    """Compare what the trained model and the merged model decide from (``_decisions``' output).

    ``passed``: the largest difference is within ``MERGE_TOLERANCE`` for the merged dtype, and at
    least ``MERGE_AGREEMENT`` of the rows keep their predicted class, not counting near ties: rows
    whose two best scores in the trained model are within twice the tolerance, which rounding may
    legitimately swap (on a 32-row check, 99.5% leaves no other row to lose).
    """
    difference = float(np.abs(after[0] - before[0]).max())
    kept = after[0].argmax(1) == before[0].argmax(1)
    tolerance = MERGE_TOLERANCE[task][dtype]
    top_two = np.sort(before[0], axis=1)[:, -2:]
    near_tie = (top_two[:, 1] - top_two[:, 0]) <= 2 * tolerance
    decisive = kept[~near_tie]
    check: dict[str, Any] = {
        "rows": len(before[0]),
        "dtype": str(dtype).removeprefix("torch."),
        "max_abs_difference": difference,
        "tolerance": tolerance,
        "same_predictions": float(kept.mean()),
        "changed_near_ties": int((~kept & near_tie).sum()),
    }
    if task == "instruct":
        equal = [a == b for a, b in zip(before[1], after[1], strict=True)]
        check["same_answers"] = sum(equal) / len(equal)
    agreement = float(decisive.mean()) if len(decisive) else 1.0
    check["passed"] = difference <= tolerance and agreement >= MERGE_AGREEMENT
    return check


def merge_and_save(
    adapter_folder: str | Path,
    merged_folder: str | Path,
    check_texts: Sequence[str] | None = None,
    shard_bytes: int = SHARD_BYTES,
) -> tuple[Any, Any, dict[str, Any] | None]:
    """Merge an adapter into its base, streamed into ``merged_folder``, and check the result.

    The adapter is loaded on the base it was trained on (the 4-bit model for QLoRA) and merged layer
    by layer (``stream_merge``), so no 16-bit copy of the model is ever whole in GPU memory or RAM.
    With ``check_texts``, the merged weights are checked layer by layer against the trained model
    (``check_merge_by_layer``, which fits wherever training did); then, where the merged model fits
    this GPU (``merged_model_fits``, decided once the trained model is freed, before loading), it is
    loaded as ``helpers.predict`` loads it and compared with the trained model on ``check_texts``
    (``merge_check``). Returns
    (merged_model or None when it does not fit, tokenizer, check or None).
    """
    meta = read_labels(adapter_folder)
    config = _config_from_labels(meta)
    dtype = merge_dtype().value
    model, tokenizer = load_adapter(
        adapter_folder,
        load_in_4bit=config.load_in_4bit,
        dtype=None if config.load_in_4bit else dtype,
    )
    before = None if check_texts is None else _decisions(model, tokenizer, check_texts, config)
    stream_merge(model, tokenizer, adapter_folder, merged_folder, dtype, shard_bytes)
    by_layer = None if check_texts is None else check_merge_by_layer(model, merged_folder)
    (model,) = release_memory(model)  # before deciding: the merged model would replace it
    if not merged_model_fits(merged_folder, dtype):
        print(
            f"The merged model ({merged_size(merged_folder) / 1e9:.1f} GB) is saved but does not "
            "fit this GPU: its weights were checked layer by layer, and the adapter on its 4-bit "
            "base serves instead (python -m helpers.predict --model RUN/adapter)."
        )
        return None, tokenizer, by_layer
    merged, tokenizer, _ = load_for_inference(merged_folder, dtype=dtype)
    check = None
    if before is not None:
        after = _decisions(merged, tokenizer, check_texts, config)
        check = merge_check(before, after, dtype, config.task)
        check["by_layer"] = by_layer
        check["passed"] = check["passed"] and by_layer["passed"]
    return merged, tokenizer, check


def model_bytes(model_config: Any, num_labels: int, task: str, dtype: torch.dtype) -> int:
    """Bytes of a whole model in ``dtype``, from its config alone (on a simulated GPU: at the
    Llama 3 8B shape, as the simulation counts it)."""
    counts = parameter_counts(runtime_shape(model_config), num_labels, task)
    return counts["total"] * torch.tensor([], dtype=dtype).element_size()


def merged_size(folder: str | Path) -> int:
    """Bytes of the weights in a model folder (on a simulated GPU: what they would be at the
    Llama 3 8B shape, in the folder's dtype)."""
    folder = Path(folder)
    if simulated_runtime() is None:
        return sum(path.stat().st_size for path in folder.glob("*.safetensors"))
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(folder)
    meta = read_labels(folder)
    task = meta.get("task", "classify")
    return model_bytes(model_config, len(meta["labels"]), task, _folder_dtype(folder))


def merged_model_fits(folder: str | Path, dtype: torch.dtype | None = None) -> bool:
    """True on the CPU, or where the GPU has room for the merged weights (in ``dtype``, default
    the folder's) and 20% more (its working set); decided from the files, before anything is
    loaded. Free the models you hold first: they take the room the merged model would need."""
    memory = gpu_memory()
    if memory is None:
        return True
    size = merged_size(folder)
    if dtype is not None:
        size = size * dtype.itemsize // _folder_dtype(folder).itemsize
    return size * 1.2 <= memory[0]


def _folder_dtype(folder: str | Path) -> torch.dtype:
    """The dtype a model folder's config.json names (fp16 where it names none)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float16"
    return getattr(torch, name) if isinstance(name, str) else torch.float16


def servable_folder(folder: str | Path, adapter: str | Path | None = None) -> Path:
    """The folder to serve: ``folder``; or the run's ``adapter`` (default: ``adapter/`` beside
    ``folder``) on its 4-bit base, the trained model itself, where ``folder`` is a merged model that
    does not fit this GPU, or is gone (on a hosted runtime merged models live on the local disk,
    which a new session starts without)."""
    folder = Path(folder)
    adapter = Path(adapter) if adapter is not None else folder.parent / "adapter"
    if (folder / "adapter_config.json").is_file():
        return folder
    has_adapter = (adapter / "adapter_config.json").is_file()
    if not (folder / "config.json").is_file():
        if has_adapter:
            print(f"no merged model in {folder}: serving {adapter} on its 4-bit base")
            return adapter
        return folder  # load_for_inference names what is missing
    if merged_model_fits(folder):
        return folder
    free = gpu_memory()[0] / 2**30
    size = merged_size(folder) / 1e9
    if has_adapter:
        print(
            f"{folder}: the merged model ({size:.1f} GB) does not fit this GPU ({free:.1f} GiB "
            f"free): serving {adapter} on its 4-bit base instead"
        )
        return adapter
    raise ModelError(
        f"{folder}: the merged model ({size:.1f} GB) does not fit this GPU ({free:.1f} GiB free). "
        "Pass the run's adapter/ folder instead (served on the 4-bit base), or use a larger GPU."
    )


def _shard_reader(folder: Path) -> Any:
    """``read(name)``: one tensor of a merged folder, read from its shard alone (``safe_open``)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = json.loads(index.read_text())["weight_map"]
    else:
        with safe_open(str(folder / "model.safetensors"), "pt") as handle:
            files = dict.fromkeys(handle.keys(), "model.safetensors")

    def read(name: str) -> torch.Tensor | None:
        if name not in files:
            return None
        with safe_open(str(folder / files[name]), "pt") as handle:
            return handle.get_tensor(name)

    return read


def check_merge_by_layer(model: Any, merged_folder: str | Path) -> dict[str, Any]:
    """Check a merged folder against the trained model one layer at a time (it fits wherever the
    trained model does: one merged tensor in memory at a time).

    For each LoRA layer, random inputs go through the trained layer (its 4-bit weight plus the LoRA
    update, as peft computes them) and through the merged weight read from its shard; the two must
    agree within a tenth of the LoRA update's own contribution, plus the rounding of the merged
    weight's precision, so a shard without the update fails. Tensors trained whole (the ``score``
    head) must equal the trained copy within that rounding. Returns the worst layer's error as a
    share of its LoRA contribution, and ``passed``."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    read = _shard_reader(Path(merged_folder))
    generator = torch.Generator().manual_seed(0)
    worst, layers, problems = 0.0, 0, []
    for name, module in model.get_base_model().named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            trained = module.modules_to_save[module.active_adapters[0]]
            for key, tensor in trained.state_dict().items():
                saved = read(f"{name}.{key}")
                if saved is None or not _close(saved, tensor):
                    problems.append(f"{name}.{key}")
            continue
        if not isinstance(module, LoraLayer):
            continue
        saved = read(f"{name}.weight")
        if saved is None:
            problems.append(f"{name}.weight missing")
            continue
        x = torch.randn(4, module.in_features, generator=generator)
        x = x.to(module.lora_A[module.active_adapters[0]].weight.device)
        with torch.no_grad():
            expected = module(x).float()
            update = expected - module.get_base_layer()(x).float()
            merged = saved.to(x.device).float()
            got = x @ merged.T
        rounding = 2 * torch.finfo(saved.dtype).eps * (x.abs() @ merged.abs().T)
        error = (got - expected).abs() - rounding.max()
        share = float(error.max() / update.abs().max().clamp_min(1e-12))
        worst, layers = max(worst, share), layers + 1
    passed = layers > 0 and worst <= 0.1 and not problems
    return {
        "layers": layers,
        "worst_error_of_update": worst,
        "problems": problems,
        "passed": passed,
    }


def _close(saved: torch.Tensor, trained: torch.Tensor) -> bool:
    """A tensor as saved in a merged folder's precision against the trained one."""
    trained = trained.detach().to("cpu").float()
    eps = torch.finfo(saved.dtype).eps if saved.is_floating_point() else 0.0
    return bool((saved.float() - trained).abs().max() <= eps * trained.abs().max() + 1e-12)


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
    id2label = dict(enumerate(meta["labels"]))
    dtype = dtype or serving_dtype().value
    if (folder / "adapter_config.json").is_file():
        # on the base it was trained on: no 16-bit copy of a 4-bit-trained base
        base = meta.get("base_model", "?")
        try:
            model, tokenizer = load_adapter(
                folder, load_in_4bit=meta.get("trained_in_4bit", True), dtype=dtype
            )
        except ModelError as error:
            raise ModelError(f"the adapter's base model {base} cannot be loaded: {error}") from None
        except OSError as error:
            raise ModelError(
                f"the adapter's base model {base} cannot be loaded ({_first_line(error)}). "
                "Make it available (the Hub id, or the course's bundled model), or predict with "
                "the run's merged/ folder."
            ) from None
    elif (folder / "config.json").is_file():
        if not merged_model_fits(folder, dtype):
            raise ModelError(
                f"the merged model in {folder} ({merged_size(folder) / 1e9:.1f} GB) does not fit "
                f"this GPU ({gpu_memory()[0] / 2**30:.1f} GiB free). Load the run's adapter/ "
                "folder instead (served on the 4-bit base), or free the models you hold."
            )
        tokenizer = load_tokenizer(str(folder))
        auto_class = (
            AutoModelForCausalLM
            if meta.get("task") == "instruct"
            else AutoModelForSequenceClassification
        )
        try:
            # straight to the GPU shard by shard (device_map), never whole in RAM first
            model = auto_class.from_pretrained(
                folder,
                dtype=dtype,
                attn_implementation=attention_implementation().value,
                device_map=device_map(),
            )
        except torch.OutOfMemoryError:
            raise ModelError(
                f"out of GPU memory loading {folder}: other models still hold it. Free them "
                "(accelerate.utils.release_memory), or load the run's adapter/ folder instead."
            ) from None
        except Exception as error:  # a truncated or damaged weights file: safetensors' errors
            raise ModelError(
                f"cannot load the model in {folder} ({type(error).__name__}: "
                f"{_first_line(error)}). Its files are damaged or incomplete (an interrupted "
                "copy?): copy the folder again, or rerun python -m helpers.train."
            ) from None
        saved = {int(i): name for i, name in (model.config.id2label or {}).items()}
        if meta.get("task") != "instruct" and saved != id2label:
            raise ModelError(
                f"{folder}: course_labels.json names {id2label} but the model's config.json "
                f"{saved}. They come from different runs: copy the folder again from one run."
            )
    else:
        raise ModelError(
            f"{folder} is neither a merged model (config.json) nor an adapter "
            "(adapter_config.json). Pass the merged/ or adapter/ folder of a run."
        )
    model.eval()
    return model, tokenizer, id2label
