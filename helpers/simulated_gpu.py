"""A simulated T4 on the CPU: does every step of the Llama 3 8B path fit a free Colab T4 (or
Kaggle's two)? Machinery of the course's tests, not a lesson.

    COURSE_SIMULATE_GPU=t4 COURSE_PROFILE=llama3-tiny python -m helpers.train --output-dir runs/t4

With ``COURSE_SIMULATE_GPU`` set (``t4`` or ``kaggle``), importing ``helpers`` starts it. Tensors
stay on the CPU; what changes:

* ``helpers.hardware`` answers as that runtime would: free GPU memory, fp16 decisions, its name;
* a ledger holds every model loaded with ``from_pretrained`` (the course's loaders and a plain call
  in a notebook cell alike) and counts it at the size it would have **at the Llama 3 8B shape**, in
  the dtypes it holds now (4-bit linear layers, 16-bit or fp32 embeddings and heads, LoRA), so a
  ``dequantize()`` or a cast is counted as it happens; a model that is freed leaves it;
* before each forward pass of a counted model, the step's working set at the 8B shape (training's
  activations and optimizer state, or evaluation's transient values, key-value cache and logits,
  as ``helpers.memory`` estimates them for the batch actually given) is added; past the runtime's
  free GPU memory the step raises ``torch.OutOfMemoryError`` with the would-be figures; a model
  placed on the CPU counts against the runtime's RAM, past which it raises ``MemoryError``.

The simulation is about memory, not numerics: the CPU computes as it always does (no fp16
autocast, no GPU kernels).
"""

from __future__ import annotations

import functools
import gc
import weakref
from typing import Any

import torch

from helpers import hardware
from helpers.config import CourseConfig
from helpers.hardware import Runtime
from helpers.memory import (
    LINEAR_NAMES,
    LLAMA3_8B_SHAPE,
    NF4_BYTES_PER_WEIGHT,
    activation_bytes,
    kv_cache_bytes,
    lora_parameters,
    parameter_counts,
)

GiB = 2**30
SHAPE = LLAMA3_8B_SHAPE
AUTOCAST_BYTES = 2  # a T4 trains under fp16 autocast


def _element(tensor: torch.Tensor | None) -> float:
    if tensor is None:
        return 0.0
    if tensor.__class__.__name__ == "Params4bit":
        return NF4_BYTES_PER_WEIGHT
    return tensor.element_size()


def lora_settings(model: torch.nn.Module) -> CourseConfig | None:
    """The LoRA rank and adapted layers of ``model`` as settings, or None without LoRA."""
    layers = [(name, m) for name, m in model.named_modules() if hasattr(m, "lora_A")]
    if not layers:
        return None
    rank = max(max(m.r.values(), default=1) for _, m in layers)
    names = sorted({name.rsplit(".", 1)[-1] for name, _ in layers} & set(LINEAR_NAMES))
    labels = [str(i) for i in range(getattr(model.config, "num_labels", 2))]
    return CourseConfig(lora_r=rank, lora_target_modules=names or "all-linear", labels=labels)


def lora_weights(settings: CourseConfig | None) -> int:
    """The trainable weights of a LoRA with ``settings`` at the 8B shape (``helpers.memory``)."""
    return 0 if settings is None else lora_parameters(SHAPE, settings)


def weights_bytes(model: torch.nn.Module) -> float:
    """What ``model`` would hold at the Llama 3 8B shape, in the dtypes its parts have now: the
    linear layers (4-bit or 16-bit), the embedding, the head (the untied language-model head, or
    the ``score`` layer) and the LoRA weights (fp32, as peft keeps them)."""
    s = SHAPE
    causal = hasattr(model, "lm_head")
    head = model.lm_head if causal else getattr(model, "score", None)
    head_weight = next(head.parameters(), None) if head is not None else None
    linear = model.model.layers[0].self_attn.q_proj
    linear = linear.get_base_layer() if hasattr(linear, "get_base_layer") else linear
    counts = parameter_counts(SHAPE, getattr(model.config, "num_labels", 2))
    head_count = s["hidden_size"] * (s["vocab_size"] if causal else model.config.num_labels)
    total = counts["linear"] * _element(linear.weight)
    total += s["vocab_size"] * s["hidden_size"] * _element(model.get_input_embeddings().weight)
    total += head_count * _element(head_weight)
    return total + lora_weights(lora_settings(model)) * 4  # peft keeps LoRA weights in fp32


class Ledger:
    """The models the simulated GPU (or the runtime's RAM) holds, counted at the 8B shape."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.models: dict[int, tuple[weakref.ref, str]] = {}
        self.peak = 0.0  # the most bytes held at once on the GPU, as peak_memory_mb reports it

    def add(self, model: torch.nn.Module, place: str, what: str) -> None:
        key = id(model)
        self.models[key] = (weakref.ref(model), place)
        weakref.finalize(model, self.models.pop, key, None)
        try:
            self.check(0.0, f"loading {what}")
        except BaseException:  # a load that does not fit holds nothing afterwards
            self.models.pop(key, None)
            raise
        model.register_forward_pre_hook(_check_step, with_kwargs=True)

    def bytes_of(self, model: torch.nn.Module) -> float:
        """What ``model`` holds on the simulated GPU (0 where the ledger does not count it)."""
        return weights_bytes(model) if id(model) in self.models else 0.0

    def held(self, place: str = "gpu") -> list[tuple[torch.nn.Module, float]]:
        live = [(ref(), where) for ref, where in list(self.models.values())]
        return [(m, weights_bytes(m)) for m, where in live if m is not None and where == place]

    def gpu_bytes(self) -> float:
        return sum(size for _, size in self.held("gpu"))

    def check(self, working: float, what: str) -> None:
        """Raise as the runtime would when its GPU or RAM cannot hold the models and ``working``."""
        for attempt in range(2):  # a freed model in a reference cycle leaves after a collection
            held = self.held("gpu")
            need = sum(size for _, size in held) + working
            ram = sum(size for _, size in self.held("cpu"))
            if need <= self.runtime.gpu_free and ram <= self.runtime.ram:
                self.peak = max(self.peak, need)
                return
            if attempt == 0:
                del held  # no reference of ours may keep a freed model alive
                gc.collect()
        models = ", ".join(f"{type(m).__name__} {size / GiB:.1f} GiB" for m, size in held)
        if ram > self.runtime.ram:
            raise MemoryError(
                f"simulated {self.runtime.name}: {what} needs {ram / 1e9:.1f} GB of RAM at the "
                f"Llama 3 8B shape; the runtime has {self.runtime.ram / 1e9:.1f} GB"
            )
        raise torch.OutOfMemoryError(
            f"simulated {self.runtime.name}: {what} needs about {need / GiB:.1f} GiB at the "
            f"Llama 3 8B shape ({len(held)} model(s) held: {models or 'none'}; working set "
            f"{working / GiB:.1f} GiB), and the GPU has {self.runtime.gpu_free / GiB:.1f} GiB free"
        )


LEDGER: Ledger | None = None


def _tokens(args: tuple, kwargs: dict[str, Any]) -> tuple[int, int, int]:
    """(rows, new tokens, tokens already in the key-value cache) of a forward call."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    rows, new = (ids.shape[0], ids.shape[1]) if ids is not None and ids.dim() >= 2 else (1, 1)
    cache = kwargs.get("past_key_values")
    past = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
    return rows, new, int(past)


def _logit_rows(kwargs: dict[str, Any], rows: int, new: int) -> int:
    keep = kwargs.get("logits_to_keep", 0)
    if isinstance(keep, torch.Tensor):
        if keep.dtype == torch.bool:
            return int(keep.sum())
        return keep.numel() if keep.dim() == 2 else rows * keep.numel()
    return rows * (keep or new)


def step_bytes(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> float:
    """The working set of this forward pass at the 8B shape (``helpers.memory``'s formulas)."""
    rows, new, past = _tokens(args, kwargs)
    s = SHAPE
    causal = hasattr(model, "lm_head")
    logits = _logit_rows(kwargs, rows, new) * s["vocab_size"] if causal else 0
    if torch.is_grad_enabled() and model.training:
        settings = lora_settings(model)
        activations = activation_bytes(
            settings or CourseConfig(),
            SHAPE,
            AUTOCAST_BYTES,
            rows,
            new,
            bool(getattr(model, "is_activation_checkpointing", False)),
            residual=int(_element(model.get_input_embeddings().weight)),
        )
        # gradients and Adam's two moments of every LoRA weight, fp32
        return activations + logits * (AUTOCAST_BYTES + 8) + lora_weights(settings) * 12
    element = _element(model.get_input_embeddings().weight)  # the residual stream's precision
    transient = rows * new * element * (s["hidden_size"] + 3 * s["intermediate_size"])
    cache = 0
    if causal and kwargs.get("use_cache", True) is not False:
        cache = kv_cache_bytes(SHAPE, rows * (past + new), element)
    return transient + cache + logits * (element + 4)


def _check_step(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    if LEDGER is not None and id(module) in LEDGER.models:
        training = torch.is_grad_enabled() and module.training
        LEDGER.check(
            step_bytes(module, args, kwargs), "a training step" if training else "a forward pass"
        )


def _place(device_map: Any) -> str:
    """Where a model loaded with ``device_map`` lives on the runtime: its GPU, or the RAM."""
    values = device_map.values() if isinstance(device_map, dict) else [device_map]
    return "cpu" if any(str(v) in ("cpu", "disk") for v in values) else "gpu"


def _counted_from_pretrained(original: Any) -> Any:
    @functools.wraps(original)
    def from_pretrained(cls: Any, *args: Any, **kwargs: Any) -> Any:
        model = original(cls, *args, **kwargs)
        # bitsandbytes repacks 4-bit weights for CPU inference only; on a GPU it never does
        for module in model.modules():
            if getattr(module, "support_avx512bf16_for_cpu", False):
                module.support_avx512bf16_for_cpu = False
        # the Llama-architecture models the course loads (a head on decoder layers)
        counted = hasattr(getattr(model, "model", None), "layers")
        if LEDGER is not None and counted:
            LEDGER.add(model, _place(kwargs.get("device_map")), f"{cls.__name__}.from_pretrained")
        return model

    return classmethod(from_pretrained)


def _counted_dequantize(original: Any) -> Any:
    @functools.wraps(original)
    def dequantize(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        if LEDGER is not None:
            LEDGER.check(0.0, "de-quantizing a model")
        return result

    return dequantize


def start() -> Ledger | None:
    """Start the simulation that ``COURSE_SIMULATE_GPU`` names (once a process); None when unset."""
    global LEDGER
    runtime = hardware.simulated_runtime()
    if runtime is None or LEDGER is not None:
        return LEDGER
    from transformers import PreTrainedModel

    LEDGER = Ledger(runtime)
    PreTrainedModel.from_pretrained = _counted_from_pretrained(
        PreTrainedModel.from_pretrained.__func__
    )
    PreTrainedModel.dequantize = _counted_dequantize(PreTrainedModel.dequantize)
    hardware.simulated_gpu = LEDGER
    return LEDGER
