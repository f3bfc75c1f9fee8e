"""Llama 3's own pieces, offline: Meta's tokenizer (converted from llama-models) and the
``llama3-tiny`` profile, which runs the ``llama3-8b`` code path with a small random model."""

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoConfig

from helpers.config import PROFILES, load_config
from helpers.data import load_ag_news
from helpers.memory import LLAMA3_8B_SHAPE
from helpers.modeling import (
    LLAMA3_PATTERN,
    LLAMA3_SPECIAL_TOKENS,
    llama3_tiny,
    llama3_tokenizer,
    load_classifier,
    load_tokenizer,
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(llama3_tokenizer()))


def test_known_llama3_ids_and_begin_of_text_first(tokenizer):
    assert tokenizer("Hello world")["input_ids"] == [128000, 9906, 1917]
    assert tokenizer.bos_token == "<|begin_of_text|>" and tokenizer.bos_token_id == 128000
    assert tokenizer.eos_token_id == 128001
    assert tokenizer.convert_tokens_to_ids(["<|start_header_id|>", "<|eot_id|>"]) == [
        128006,
        128009,
    ]
    assert len(tokenizer) == 128256
    # Llama 3 has no pad token: the course pads with the end-of-text token
    assert tokenizer.pad_token_id == tokenizer.eos_token_id


def test_the_converted_tokenizer_matches_tiktoken_on_the_bundled_rows(tokenizer):
    from tiktoken import Encoding
    from tiktoken.load import load_tiktoken_bpe

    spec = importlib.util.find_spec("llama_models")
    source = Path(list(spec.submodule_search_locations)[0]) / "llama3" / "tokenizer.model"
    ranks = load_tiktoken_bpe(str(source))
    meta = Encoding(
        name="llama3",
        pat_str=LLAMA3_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={token: len(ranks) + i for i, token in enumerate(LLAMA3_SPECIAL_TOKENS)},
    )
    texts = load_ag_news()["text"].tolist()[:300] + ["  two  spaces\nand ünïcödé 12345 😀"]
    ours = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert ours == [meta.encode(text) for text in texts]


def test_the_licence_notice_sits_beside_the_tokenizer():
    for folder in (llama3_tokenizer(), llama3_tiny()):
        assert "Meta Llama 3 Community License" in (folder / "LICENSE-NOTICE.txt").read_text()


def test_llama3_tiny_keeps_the_8b_architecture():
    config = AutoConfig.from_pretrained(llama3_tiny())
    assert config.vocab_size == LLAMA3_8B_SHAPE["vocab_size"] == 128256
    ratio = LLAMA3_8B_SHAPE["num_attention_heads"] // LLAMA3_8B_SHAPE["num_key_value_heads"]
    assert config.num_attention_heads // config.num_key_value_heads == ratio
    assert config.rope_parameters["rope_theta"] == LLAMA3_8B_SHAPE["rope_theta"]
    assert not config.tie_word_embeddings and config.bos_token_id == 128000
    assert config.pad_token_id is None  # as the Hub's: the course sets it
    assert config.num_hidden_layers == 2


def test_llama3_tiny_loads_in_4bit_with_pad_on_tokenizer_and_model():
    config = load_config("llama3-tiny")
    assert config.model_name == "llama3-tiny" and config.gradient_checkpointing == "auto"
    # the profile is llama3-8b's, bar the model, the data source, the split and the logging
    big = PROFILES["llama3-8b"].config()
    for key in ("max_length", "learning_rate", "eval_batch_size", "lora_r", "batch_size"):
        assert getattr(config, key) == getattr(big, key), key
    model, tokenizer = load_classifier(config)
    assert model.config.pad_token_id == tokenizer.pad_token_id == 128001
    assert model.model.embed_tokens.weight.shape[0] == 128256
    assert any("4bit" in type(module).__name__ for module in model.modules())


def test_train_predict_and_merge_on_llama3_tiny(run_command, tmp_path, monkeypatch):
    run = tmp_path / "run"
    result = run_command("helpers.train", "--profile", "llama3-tiny", "--output-dir", run)
    assert result.returncode in (0, None), result.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["profile"] == "llama3-tiny" and metrics["train_rows"] == 32
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))
    assert metrics["merge_check"]["passed"] and metrics["merge_check"]["same_predictions"] == 1.0
    assert metrics["gradient_checkpointing"] is False  # "auto": it fits without
    merged = run / "merged"
    assert json.loads((merged / "config.json").read_text()).get("quantization_config") is None

    news = tmp_path / "news.csv"
    pd.DataFrame({"text": ["Stocks fell sharply.", "The keeper saved a penalty."]}).to_csv(
        news, index=False
    )
    out = tmp_path / "predicted.csv"
    result = run_command("helpers.predict", "--model", merged, "--input", news, "--output", out)
    assert result.returncode in (0, None), result.stderr[-3000:]
    predicted = pd.read_csv(out)
    assert len(predicted) == 2
    assert set(predicted["predicted_label"]) <= {"World", "Sports", "Business", "Sci/Tech"}


def test_the_t4_fp16_path_trains_on_the_cpu():
    """A T4's settings on llama3-tiny: 4-bit layers computing in fp16, fp16 autocast, a gradient
    scaler. The Trainer refuses fp16 without a GPU, so the step is the one it would run: autocast
    forward, scaled backward, unscale, optimizer step."""
    from helpers.modeling import add_lora, bnb_config

    # checkpointing on, as "auto" decides for Llama 3 8B on a T4
    config = load_config("llama3-tiny", gradient_checkpointing=True)
    fp16 = bnb_config(torch.float16)  # bnb_4bit_compute_dtype=fp16, as on a T4
    model, tokenizer = load_classifier(
        config, load_in_4bit=True, dtype=torch.float16, quantization_config=fp16
    )
    model = add_lora(model, config)
    assert model.is_gradient_checkpointing
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)  # fp32 master weights
    batch = tokenizer(
        ["Stocks rallied on Friday.", "The keeper saved a penalty in extra time."],
        padding=True,
        return_tensors="pt",
    )
    labels = torch.tensor([2, 1])
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = [p.detach().clone() for p in trainable]
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.float16):
            logits = model(**batch).logits
        assert logits.dtype == torch.float16
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    assert scaler.get_scale() > 0
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, trainable, strict=True))
