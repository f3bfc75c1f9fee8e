import os
import time

import pytest
import torch

from helpers.hardware import compute_dtype
from helpers.modeling import (
    ModelError,
    add_lora,
    bnb_config,
    bundled_gguf_path,
    is_4bit,
    load_classifier,
    load_tokenizer,
    lora_config,
    memory_footprint_mb,
    resolve_model,
    trainable_parameters,
)


@pytest.fixture(scope="module")
def classifier_4bit(cpu_config):
    return load_classifier(cpu_config)


def test_bundled_model_is_cached_as_safetensors(cpu_config):
    assert bundled_gguf_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    path = resolve_model(cpu_config.model_name)
    assert os.path.isfile(os.path.join(path, "model.safetensors"))
    start = time.perf_counter()
    assert resolve_model("smollm2") == path  # second call: no conversion
    assert time.perf_counter() - start < 1.0
    assert resolve_model("meta-llama/Meta-Llama-3-8B") == "meta-llama/Meta-Llama-3-8B"


def test_tokenizer_pads_right_with_a_pad_token(cpu_config):
    tokenizer = load_tokenizer(resolve_model(cpu_config.model_name))
    batch = tokenizer(["short", "a somewhat longer text"], padding=True)
    assert tokenizer.padding_side == "right" and tokenizer.pad_token_id is not None
    assert (
        batch["attention_mask"][0][-1] == 0 and batch["input_ids"][0][-1] == tokenizer.pad_token_id
    )


def test_nf4_config_and_cpu_precision():
    config = bnb_config()
    assert (
        config.load_in_4bit
        and config.bnb_4bit_quant_type == "nf4"
        and config.bnb_4bit_use_double_quant
    )
    # on a CPU: bitsandbytes trains slowly with bf16 compute
    assert compute_dtype().value == torch.float32
    assert config.bnb_4bit_compute_dtype == torch.float32


def test_4bit_classifier_has_a_new_head_and_pad_token(classifier_4bit, cpu_config):
    model, tokenizer = classifier_4bit
    assert is_4bit(model)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert model.score.weight.shape == (4, model.config.hidden_size)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.id2label[1] == "Sports"
    # prepare_model_for_kbit_training froze the base
    assert not any(p.requires_grad for p in model.parameters())
    fp32, _ = load_classifier(cpu_config, load_in_4bit=False)
    assert not is_4bit(fp32)
    assert memory_footprint_mb(model) < 0.4 * memory_footprint_mb(fp32)
    inputs = tokenizer(
        ["Stocks fell sharply.", "The team won the cup final on Sunday."],
        padding=True,
        return_tensors="pt",
    )
    assert model(**inputs).logits.shape == (2, 4)


def test_lora_trains_adapters_and_the_score_head(cpu_config):
    model, _ = load_classifier(cpu_config)
    peft_model = add_lora(model, cpu_config)
    counts = trainable_parameters(peft_model)
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert any("score" in name for name in trainable) and any(
        "lora_A" in name for name in trainable
    )
    assert 0 < counts["percent"] < 10
    attention_only, _ = load_classifier(
        cpu_config.replace(lora_target_modules=["q_proj", "v_proj"])
    )
    fewer = trainable_parameters(
        add_lora(attention_only, cpu_config.replace(lora_target_modules=["q_proj", "v_proj"]))
    )
    assert fewer["trainable"] < counts["trainable"]
    assert lora_config(cpu_config).task_type == "SEQ_CLS"


def test_gated_model_without_access_says_how_to_fix(cpu_config, monkeypatch):
    import huggingface_hub.constants

    # offline as HF_HUB_OFFLINE=1 makes it (read once, when huggingface_hub is imported)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(ModelError, match="hf auth login.*COURSE_PROFILE=smollm2-cpu"):
        load_tokenizer("meta-llama/Meta-Llama-3-8B")


def _first_layer_lora_grad(model, tokenizer, evaluate_first):
    from helpers.evaluation import predict_logits

    texts = ["Stocks fell sharply on Wall Street.", "The striker scored twice in the final."]
    if evaluate_first:
        predict_logits(model, tokenizer, texts, progress=False)
    model.train()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    torch.manual_seed(0)  # same LoRA dropout masks in both runs
    model(**batch, labels=torch.tensor([2, 1])).loss.backward()
    return (
        model.base_model.model.model.layers[0]
        .self_attn.q_proj.lora_B["default"]
        .weight.grad.clone()
    )  # lora_A starts with no gradient (B = 0)


def test_evaluating_before_training_keeps_4bit_gradients(cpu_config):
    """bitsandbytes repacks 4-bit weights for CPU inference; after that, base-layer gradients were
    lost."""
    fresh, tokenizer = load_classifier(cpu_config)
    evaluated, _ = load_classifier(cpu_config)
    expected = _first_layer_lora_grad(add_lora(fresh, cpu_config), tokenizer, evaluate_first=False)
    got = _first_layer_lora_grad(add_lora(evaluated, cpu_config), tokenizer, evaluate_first=True)
    assert not any(
        getattr(
            getattr(getattr(m, "weight", None), "quant_state", None),
            "packing_format_for_cpu",
            False,
        )
        for m in evaluated.modules()
    )
    assert expected.abs().sum() > 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)


def test_serving_precision_follows_the_cpu():
    from helpers.hardware import serving_dtype

    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert serving_dtype().value == (torch.bfloat16 if native else torch.float32)


def test_hardware_name_says_the_instructions_bf16_and_threads(monkeypatch):
    from helpers.hardware import hardware_name

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    name = hardware_name()
    assert (
        f"({torch.backends.cpu.get_cpu_capability()}, no native bf16), {torch.get_num_threads()} "
        "threads" in name
    )
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert "native bf16)" in hardware_name() and "no native" not in hardware_name()


def test_attention_kernel_follows_the_device_and_eager_matches_sdpa(cpu_config, classifier_4bit):
    from helpers.hardware import attention_implementation

    assert (
        attention_implementation().value == "eager"
        and attention_implementation("sdpa").value == "sdpa"
    )
    model, tokenizer = classifier_4bit
    assert model.config._attn_implementation == "eager"  # the course's default on the CPU
    inputs = tokenizer(
        ["Stocks fell sharply.", "The team won the cup final on Sunday after extra time."],
        padding=True,
        return_tensors="pt",
    )  # right padding: the mask matters
    with torch.inference_mode():
        eager = model(**inputs).logits
        model.set_attn_implementation("sdpa")
        sdpa = model(**inputs).logits
        model.set_attn_implementation("eager")
    torch.testing.assert_close(eager, sdpa, rtol=1e-4, atol=1e-4)
    from helpers.config import ConfigError

    with pytest.raises(ConfigError, match="attn_implementation='flash'"):
        cpu_config.replace(attn_implementation="flash")


def test_bf16_autocast_training_step_follows_the_fp32_gradient(cpu_config):
    """The CPU trains under bf16 autocast (mixed_precision); its LoRA gradients must point where
    fp32's do."""
    from helpers.hardware import cpu_has_fast_bf16, mixed_precision

    assert mixed_precision().value == {"bf16": cpu_has_fast_bf16(), "fp16": False}
    torch.manual_seed(0)
    model, tokenizer = load_classifier(cpu_config)
    model = add_lora(model, cpu_config)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)  # non-zero B: the gradient of A is non-zero too
    inputs = tokenizer(
        ["Oil prices rose on supply fears.", "The striker scored twice in the derby."] * 2,
        padding=True,
        return_tensors="pt",
    )
    labels = torch.tensor([2, 1, 2, 1])

    def gradient(autocast: bool) -> torch.Tensor:
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(**inputs).logits
        torch.nn.functional.cross_entropy(logits.float(), labels).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    fp32, bf16 = gradient(False), gradient(True)
    assert fp32.abs().sum() > 0
    assert torch.nn.functional.cosine_similarity(fp32, bf16, dim=0) > 0.99
