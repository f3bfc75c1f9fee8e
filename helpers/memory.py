"""Will it fit? Estimate peak memory of a QLoRA run from the model's config, before loading any
weights.

Taught in notebook 00 (the ``llama3-8b`` defaults on a 15 GB T4); ``load_classifier`` calls
``gradient_checkpointing`` and ``warn_if_too_big`` before loading. ``scripts/gpu_smoke.py`` (a GPU)
and ``scripts/cpu_step_memory.py`` (the CPU) print the estimate next to the measured peak
(``docs/performance.md``).

The estimate adds:

* **parameters**: quantized linear layers at 0.5 byte per weight plus NF4 double-quantization
  constants; everything else (embeddings, norms, the ``score`` head or the language-model head) in
  fp32 once ``prepare_model_for_kbit_training`` has cast it, else in the load precision;
* **LoRA**: adapter weights, their gradients and two Adam moments, all fp32 (16 bytes per trainable
  weight);
* the larger of two working sets:
  - **activations** kept for the backward pass of the longest training batch (for instruction
    tuning with the language-model head's logits at every answer token): per token and layer the
    values of ``layer_bytes`` (about ``4h + 4q + 4i`` in fp32, ``16h + 4kv + 5i`` under 16-bit
    autocast, plus the attention probabilities with eager attention); with gradient
    checkpointing only each layer's input (fp32 in 4-bit training: the residual stream of a
    prepared model) plus one layer's worth;
  - **evaluation** of the longest evaluation batch: one layer's transient values (``h + 3i`` a
    token, and the attention scores with eager attention) and, for instruction tuning, the
    **key-value cache** (keys and values of every layer for each prompt, repeated once per label by
    label scoring) plus the label logits;
* a fixed **overhead** for the allocator's cache, reserved but unallocated (0 on the CPU); the CUDA
  context is not counted, because the free memory the estimate is compared with excludes it.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch

from helpers.config import PROFILES, CourseConfig
from helpers.hardware import (
    Decision,
    attention_implementation,
    free_memory,
    gpu_memory,
    simulated_runtime,
)
from helpers.hardware import on_gpu as gpu_run

GiB = 2**30
# NF4 with double quantization: 4 bits a weight, an 8-bit absmax a block of 64, an fp32 constant a
# 256 blocks
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
# the allocator's cache: memory PyTorch reserved but did not allocate, which the free memory it is
# compared with still counts as free (the CUDA context is not: it is gone before "free" is read).
# Measured at the two out-of-memory errors of an H100 capped as a T4: 0.46 and 1.04 GiB
# (benchmarks/results/2026-11-25-h100/out_of_memory.txt)
CUDA_OVERHEAD_BYTES = int(0.6 * GiB)
# the Alpaca template around an article (BOS, instruction naming the labels, headers): at most this
# many tokens with SmolLM2's or Llama 3's tokenizer (tests/test_gpu_path.py checks both)
PROMPT_TEMPLATE_TOKENS = 64
# an answer: the label's tokens and EOS
ANSWER_TOKENS = 8
# the Alpaca template without an input, around an empty instruction: at least this many tokens
# (tests/test_gpu_path.py checks both tokenizers), so a general record's answer is at most
# GENERAL_MAX_TOKENS minus this
GENERAL_PROMPT_TOKENS = 24
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Meta-Llama-3-8B's config.json (the fields the estimate and scripts/gpu_smoke.py need), for offline
# use
LLAMA3_8B_SHAPE: dict[str, Any] = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}


def runtime_shape(model_config: Any) -> Any:
    """The shape this machine's memory questions are about: the model's own, or on a simulated GPU
    (``COURSE_SIMULATE_GPU``) Llama 3 8B's, the shape the simulation counts every model at."""
    return LLAMA3_8B_SHAPE if simulated_runtime() is not None else model_config


@dataclass
class MemoryEstimate:
    parameters: float
    lora_and_optimizer: float
    activations: float
    overhead: float
    evaluation: float = 0.0  # working set of an evaluation batch (key-value cache, logits)

    @property
    def training(self) -> float:
        """The training step's peak: weights, LoRA and overhead, plus the step's activations."""
        return self.parameters + self.lora_and_optimizer + self.activations + self.overhead

    @property
    def total(self) -> float:
        """The peak: weights, LoRA and overhead, plus training's or evaluation's working set,
        whichever is larger (they never coexist)."""
        working = max(self.activations, self.evaluation)
        return self.parameters + self.lora_and_optimizer + working + self.overhead

    def gib(self) -> dict[str, float]:
        return {
            **{k: round(v / GiB, 3) for k, v in asdict(self).items()},
            "total": round(self.total / GiB, 3),
        }


def _shape(model_config: Any) -> dict[str, int]:
    get = (
        model_config.get
        if isinstance(model_config, dict)
        else lambda k, d=None: getattr(model_config, k, d)
    )
    hidden, heads = get("hidden_size"), get("num_attention_heads")
    head_dim = get("head_dim") or hidden // heads
    return {
        "h": hidden,
        "heads": heads,
        "i": get("intermediate_size"),
        "layers": get("num_hidden_layers"),
        "vocab": get("vocab_size"),
        "q": heads * head_dim,
        "kv": (get("num_key_value_heads") or heads) * head_dim,
    }


def _tied(model_config: Any) -> bool:
    """Whether the language-model head shares the embedding's weights."""
    if isinstance(model_config, dict):
        return bool(model_config.get("tie_word_embeddings", False))
    return bool(getattr(model_config, "tie_word_embeddings", False))


def linear_shapes(model_config: Any) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer in one decoder layer of a Llama-architecture model."""
    s = _shape(model_config)
    return {
        "q_proj": (s["h"], s["q"]),
        "k_proj": (s["h"], s["kv"]),
        "v_proj": (s["h"], s["kv"]),
        "o_proj": (s["q"], s["h"]),
        "gate_proj": (s["h"], s["i"]),
        "up_proj": (s["h"], s["i"]),
        "down_proj": (s["i"], s["h"]),
    }


def parameter_counts(model_config: Any, num_labels: int, task: str = "classify") -> dict[str, int]:
    """Weights of a Llama model: ``linear`` (quantizable) and ``other`` (embeddings, norms and the
    head: the ``score`` layer of a classifier, or for ``task="instruct"`` the language-model head,
    which 4-bit loading leaves in 16-bit and which shares the embedding only where tied)."""
    s = _shape(model_config)
    linear = s["layers"] * sum(i * o for i, o in linear_shapes(model_config).values())
    if task == "instruct":
        head = 0 if _tied(model_config) else s["vocab"] * s["h"]
    else:
        head = s["h"] * num_labels
    other = s["vocab"] * s["h"] + (2 * s["layers"] + 1) * s["h"] + head
    return {"linear": linear, "other": other, "total": linear + other}


def lora_parameters(model_config: Any, config: CourseConfig) -> int:
    """Trainable weights: LoRA A and B on the target layers, plus the trainable copy of the score
    head."""
    targets = _lora_targets(config)
    per_layer = sum(
        config.lora_r * (i + o)
        for name, (i, o) in linear_shapes(model_config).items()
        if name in targets
    )
    return (
        _shape(model_config)["layers"] * per_layer + _shape(model_config)["h"] * config.num_labels
    )


def _lora_targets(config: CourseConfig) -> tuple[str, ...]:
    if config.lora_target_modules == "all-linear":
        return LINEAR_NAMES
    return tuple(config.lora_target_modules)


def layer_bytes(
    config: CourseConfig, model_config: Any, element: int, sequence: int, eager: bool
) -> float:
    """Bytes one decoder layer keeps for the backward pass, per token of a training batch.

    In fp32 (``element`` 4: the CPU), counted from the tensors autograd saves on SmolLM2
    (``scripts/cpu_step_memory.py`` measures the step): the residual stream at both norms (2h);
    the inputs of the linear layers (h for q/k/v, q for o_proj, h for gate/up, i for down_proj);
    the rotated queries and the keys and values repeated to every query head (3q); the MLP's gate,
    SiLU and up outputs (3i); each LoRA layer's rank-r intermediate. Under 16-bit autocast (a GPU)
    every linear layer's input is also kept as a 16-bit copy, for the 4-bit product and for LoRA:
    ``16h + 4kv + 5i`` 2-byte values, calibrated on the Llama 3 8B peaks measured on an H100
    (``docs/performance.md``). Eager attention adds each head's probabilities over the
    ``sequence`` (fp32 for the softmax, and a 16-bit copy under autocast); SDPA's fused kernels
    keep none.
    """
    s = _shape(model_config)
    if element >= 4:
        values = 4 * s["h"] + 4 * s["q"] + 4 * s["i"] + config.lora_r * len(_lora_targets(config))
        per_token = values * element
    else:
        per_token = (16 * s["h"] + 4 * s["kv"] + 5 * s["i"]) * element
    if eager:
        per_token += s["heads"] * sequence * (4 if element >= 4 else element + 4)
    return per_token


def activation_bytes(
    config: CourseConfig,
    model_config: Any,
    element: int,
    rows: int,
    sequence: int,
    checkpointing: bool,
    residual: int,
    eager: bool = False,
) -> float:
    """Bytes a training batch of ``rows`` x ``sequence`` tokens keeps for the backward pass:
    ``layer_bytes`` in every layer, or with gradient checkpointing each layer's input (the residual
    stream, ``residual`` bytes a value) and one layer's worth."""
    s = _shape(model_config)
    per_layer = layer_bytes(config, model_config, element, sequence, eager)
    if checkpointing:
        return rows * sequence * (s["layers"] * s["h"] * residual + per_layer)
    return rows * sequence * s["layers"] * per_layer


def kv_cache_bytes(model_config: Any, tokens: int, element: int) -> int:
    """Bytes of a key-value cache holding ``tokens`` tokens (summed over the batch): a key and a
    value of width kv in every layer."""
    s = _shape(model_config)
    return 2 * s["layers"] * s["kv"] * tokens * element


def sequence_tokens(config: CourseConfig) -> int:
    """The longest sequence a training batch holds: the article (``max_length``), or for
    instruction tuning the prompt around it and the answer, or a general Alpaca record."""
    if config.task != "instruct":
        return config.max_length
    classify = config.max_length + PROMPT_TEMPLATE_TOKENS + ANSWER_TOKENS
    if config.alpaca_general_rows > 0:
        from helpers.instruct import GENERAL_MAX_TOKENS

        return max(classify, GENERAL_MAX_TOKENS)
    return classify


def answer_tokens(config: CourseConfig) -> int:
    """The most tokens whose logits the loss needs in one training row: none for a classifier (its
    head reads the last token), the label and EOS for instruction tuning, nearly a whole general
    Alpaca record where those are mixed in."""
    if config.task != "instruct":
        return 0
    if config.alpaca_general_rows > 0:
        from helpers.instruct import GENERAL_MAX_TOKENS

        return max(ANSWER_TOKENS, GENERAL_MAX_TOKENS - GENERAL_PROMPT_TOKENS)
    return ANSWER_TOKENS


def evaluation_bytes(
    config: CourseConfig, model_config: Any, element: int, eager: bool = False
) -> float:
    """Working set of the longest evaluation batch (``eval_batch_size`` rows).

    A classifier keeps no cache (``use_cache=False``): one layer's transient values (with eager
    attention, its scores and probabilities too). Label scoring (instruction tuning) keeps the
    prompt's key-value cache once per label, plus each label's logits (in the model's precision,
    then fp32 for the log-softmax)."""
    s = _shape(model_config)
    rows = config.eval_batch_size

    def one_layer(tokens: int) -> float:
        scores = 2 * s["heads"] * tokens * element if eager else 0
        return rows * tokens * (element * (s["h"] + 3 * s["i"]) + scores)

    if config.task != "instruct":
        return one_layer(config.max_length)
    prompt = config.max_length + PROMPT_TEMPLATE_TOKENS
    labels = config.num_labels
    cache = kv_cache_bytes(model_config, rows * labels * (prompt + ANSWER_TOKENS), element)
    # the logits, a 16-bit model's fp32 copy of them, and their log-softmax
    logits = rows * labels * ANSWER_TOKENS * s["vocab"] * (element + 4 + (4 if element < 4 else 0))
    return cache + logits + one_layer(prompt)


def estimate_memory(
    config: CourseConfig,
    model_config: Any,
    bits: int = 4,
    dtype: torch.dtype | None = None,
    training: bool = True,
    on_gpu: bool | None = None,
    checkpointing: bool | None = None,
) -> MemoryEstimate:
    """Peak memory of loading (``training=False``) or QLoRA-training ``model_config`` with
    ``config``'s settings.

    ``bits``: 4 (NF4), 16 or 32 for the linear layers; ``dtype``: precision of everything not
    quantized (default: 16-bit on a GPU, fp32 on the CPU, as ``helpers.hardware.compute_dtype``
    picks); ``checkpointing``: with or without gradient checkpointing (default: the config's
    setting, where it is True or False; "auto" decides for this machine, as training would).
    """
    on_gpu = gpu_run() if on_gpu is None else on_gpu
    # fp16 on older GPUs: the same 2 bytes
    dtype = dtype or (torch.bfloat16 if on_gpu else torch.float32)
    element = torch.tensor([], dtype=dtype).element_size()
    counts = parameter_counts(model_config, config.num_labels, config.task)
    linear_bytes = {4: NF4_BYTES_PER_WEIGHT, 16: 2, 32: 4}[bits]
    # prepare_model_for_kbit_training casts every weight that is not 4-bit to fp32
    other_bytes = 4 if training and bits == 4 else element
    parameters = counts["linear"] * linear_bytes + counts["other"] * other_bytes
    if not training:
        return MemoryEstimate(parameters, 0.0, 0.0, CUDA_OVERHEAD_BYTES if on_gpu else 0.0)
    if checkpointing is None:
        checkpointing = gradient_checkpointing(config, model_config).value
    lora = lora_parameters(model_config, config) * 16
    s = _shape(model_config)
    sequence = sequence_tokens(config)
    eager = attention_implementation(config.attn_implementation, on_gpu).value == "eager"
    # the layer inputs kept under checkpointing are the residual stream: fp32 once
    # prepare_model_for_kbit_training has cast the embeddings (4-bit training), else the compute
    # precision
    residual = 4 if bits == 4 else element
    activations = activation_bytes(
        config, model_config, element, config.batch_size, sequence, checkpointing, residual, eager
    )
    # the language-model head's logits at each answer token: in the compute precision, in fp32 for
    # the loss, and the fp32 gradient
    activations += config.batch_size * answer_tokens(config) * s["vocab"] * (element + 8)
    if config.task == "instruct" and element < 4 and not _tied(model_config):
        # the untied head, fp32 once prepared, as autocast's 16-bit copy kept for the backward pass
        activations += s["vocab"] * s["h"] * element
    # evaluation runs without autocast (CourseTrainer removes it after training): a prepared 4-bit
    # model's residual stream, key-value cache and logits are fp32 there
    evaluation_element = 4 if bits == 4 else element
    return MemoryEstimate(
        parameters,
        lora,
        activations,
        CUDA_OVERHEAD_BYTES if on_gpu else 0.0,
        evaluation_bytes(config, model_config, evaluation_element, eager),
    )


def gradient_checkpointing(
    config: CourseConfig, model_config: Any, free_bytes: int | None = None
) -> Decision:
    """Whether training recomputes activations in the backward pass instead of keeping them.

    ``config.gradient_checkpointing`` where it is True or False. For "auto": only where the run
    would not fit in 90% of the memory free (``free_bytes``, default this machine's: the GPU's, or
    the RAM available), because checkpointing costs time (1.8x the step time measured on an H100
    with the ``llama3-8b`` defaults, ``docs/performance.md``).
    """
    if isinstance(config.gradient_checkpointing, bool):
        return Decision(config.gradient_checkpointing, "set in the config")
    free = free_memory() if free_bytes is None else free_bytes
    if free_bytes is None:
        model_config = runtime_shape(model_config)
    if free is None:
        return Decision(
            False,
            "free memory unknown: off (set gradient_checkpointing: true if a run "
            "runs out of memory)",
        )
    on_gpu = gpu_run() if free_bytes is None else True
    bits = 4 if config.load_in_4bit else 16
    without = estimate_memory(config, model_config, bits, on_gpu=on_gpu, checkpointing=False).total
    if without <= 0.9 * free:
        return Decision(
            False,
            f"not needed: about {without / GiB:.1f} GiB without it, {free / GiB:.1f} GiB free "
            "(checkpointing would recompute every layer's activations: slower)",
        )
    with_it = estimate_memory(config, model_config, bits, on_gpu=on_gpu, checkpointing=True).total
    return Decision(
        True,
        f"needed: about {without / GiB:.1f} GiB without it, {with_it / GiB:.1f} GiB with it, "
        f"{free / GiB:.1f} GiB free",
    )


def suggestions(config: CourseConfig, estimate: MemoryEstimate | None = None) -> list[str]:
    """Settings that lower the peak, cheapest first."""
    tips = []
    if estimate is not None and estimate.evaluation > estimate.activations:
        tips.append(
            f"eval_batch_size={max(config.eval_batch_size // 2, 1)} (evaluation sets the peak)"
        )
    if config.gradient_checkpointing is False:
        tips.append(
            "gradient_checkpointing=True (activations shrink to about one layer's worth; steps "
            "take up to twice as long)"
        )
    if config.batch_size > 1:
        tips.append(
            f"batch_size={config.batch_size // 2} with gradient_accumulation_steps="
            f"{config.gradient_accumulation_steps * 2} (same effective batch)"
        )
    if config.max_length > 64:
        tips.append(
            f"max_length={config.max_length // 2} if your texts are short (see notebook 01's token "
            "lengths)"
        )
    if not config.load_in_4bit:
        tips.append("load_in_4bit=True (linear weights take a quarter of 16-bit memory)")
    return tips


def warn_if_too_big(
    config: CourseConfig, model_config: Any, available_bytes: int | None = None
) -> MemoryEstimate | None:
    """Warn, before loading, when the estimated training peak exceeds 90% of the GPU's free
    memory.

    Returns the estimate, or None on a machine without a GPU (and no ``available_bytes`` given).
    """
    if available_bytes is None:
        memory = gpu_memory()
        if memory is None:
            return None
        available_bytes = memory[0]  # free, not total: another process may hold some
        model_config = runtime_shape(model_config)
    checkpointing = gradient_checkpointing(config, model_config, available_bytes).value
    estimate = estimate_memory(
        config,
        model_config,
        bits=4 if config.load_in_4bit else 16,
        on_gpu=True,
        checkpointing=checkpointing,
    )
    if estimate.total > 0.9 * available_bytes:
        warnings.warn(
            f"This run needs about {estimate.total / GiB:.1f} GiB ({estimate.gib()}) but the GPU "
            f"has {available_bytes / GiB:.1f} GiB free: it will likely run out of memory. Try: "
            + "; ".join(
                suggestions(config.replace(gradient_checkpointing=checkpointing), estimate)
            ),
            stacklevel=2,
        )
    return estimate


CHECKPOINTS_KEPT = 2  # the Trainer's save_total_limit (helpers.training.training_arguments)


def storage_plan(model_config: Any = LLAMA3_8B_SHAPE) -> list[dict[str, Any]]:
    """What the course writes, where, and how big, for ``model_config`` (Llama 3 8B by default)
    with the ``llama3-8b`` settings: small, precious files in the outputs folder (Google Drive on
    Colab, /kaggle/working on Kaggle), large ones on the runtime's local disk (lost with the
    session, and made again from the adapter in minutes)."""
    rows = []
    for task, notebook in (("classify", "06-07"), ("instruct", "08")):
        config = PROFILES["llama3-8b"].config(task)
        folder = "" if task == "classify" else "instruct/"
        lora = lora_parameters(model_config, config) * 4  # fp32
        merged = parameter_counts(model_config, config.num_labels, task)["total"] * 2  # fp16
        rows += [
            {"notebook": notebook, "what": f"{folder}adapter/", "where": "outputs", "bytes": lora},
            {
                "notebook": notebook,
                "what": f"{folder}checkpoints/ ({CHECKPOINTS_KEPT} kept: adapter and Adam's state)",
                "where": "outputs",
                "bytes": CHECKPOINTS_KEPT * lora * 3,
            },
            {
                "notebook": notebook,
                "what": f"{folder}merged/ (fp16)",
                "where": "local disk",
                "bytes": merged,
            },
        ]
    counts = parameter_counts(model_config, 4, "instruct")["total"]
    rows.append(
        {
            "notebook": "03-08",
            "what": "the Hub download (bf16, Hugging Face cache)",
            "where": "local disk",
            "bytes": counts * 2,
        }
    )
    return rows
