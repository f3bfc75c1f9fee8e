"""Instruction tuning (notebook 08, `--task instruct`): prompts, the masked loss, label scoring,
merging, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from transformers import DataCollatorForSeq2Seq

from helpers.config import ConfigError, load_config
from helpers.data import DataError, course_splits
from helpers.instruct import (
    IGNORE_INDEX,
    classify_prompts,
    encode_example,
    format_prompt,
    generate_answers,
    instruct_dataset,
    instruct_records,
    label_log_likelihoods,
    parse_label,
    prompts,
    to_alpaca,
)
from helpers.merging import load_adapter, merge, save_adapter
from helpers.modeling import load_causal_lm

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def instruct_config():
    return load_config("smollm2-cpu", task="instruct", load_in_4bit=False)


@pytest.fixture(scope="module")
def causal_lm(instruct_config):
    model, tokenizer = load_causal_lm(
        instruct_config, load_in_4bit=False, dtype=torch.float32, prepare_for_training=False
    )
    return model, tokenizer


@pytest.fixture(scope="module")
def test_prompts(instruct_config, causal_lm):
    _, tokenizer = causal_lm
    test = course_splits(instruct_config)["test"].iloc[:6]
    return prompts(
        to_alpaca(test, instruct_config.labels, tokenizer, instruct_config.max_length),
        "alpaca",
        tokenizer,
    )


def test_instruct_profile_keeps_the_head_course_split():
    head = load_config("smollm2-cpu")
    instruct = load_config("smollm2-cpu", task="instruct")
    assert instruct.task == "instruct" and instruct.instruct_train_per_class == 50
    assert course_splits(head)["test"].equals(course_splits(instruct)["test"])
    with pytest.raises(ConfigError, match="task='answer'"):
        load_config("smollm2-cpu", task="answer")


def test_training_records_take_the_first_rows_of_each_class(instruct_config, causal_lm):
    _, tokenizer = causal_lm
    train = course_splits(instruct_config)["train"]
    records = instruct_records(train, instruct_config, tokenizer)
    assert len(records) == 50 * 4
    assert records["output"].value_counts().to_dict() == {
        name: 50 for name in instruct_config.labels
    }
    first = to_alpaca(
        train.groupby("label").head(50),
        instruct_config.labels,
        tokenizer,
        instruct_config.max_length,
    )
    assert sorted(records["input"]) == sorted(first["input"])
    assert records["input"].tolist() != first["input"].tolist()  # shuffled


def test_alpaca_records_and_prompts(instruct_config, causal_lm):
    _, tokenizer = causal_lm
    df = pd.DataFrame({"text": ["Stocks fell sharply.", "Team wins the cup."], "label": [2, 1]})
    records = to_alpaca(df, instruct_config.labels)
    assert list(records.columns) == ["instruction", "input", "output"]
    assert records["output"].tolist() == ["Business", "Sports"]
    assert (
        records["instruction"][0]
        == "Classify this news article into one of: World, Sports, Business, Sci/Tech."
    )
    alpaca = format_prompt(records["instruction"][0], records["input"][0])
    assert "### Instruction:\n" in alpaca and "### Input:\nStocks fell sharply." in alpaca
    assert alpaca.endswith("### Response:\n")
    assert "### Input" not in format_prompt("Name a colour.")
    chat = format_prompt(records["instruction"][0], records["input"][0], "chat", tokenizer)
    assert chat.startswith("<|im_start|>") and chat.endswith("<|im_start|>assistant\n")
    with pytest.raises(DataError, match="`label` column"):
        to_alpaca(df[["text"]], instruct_config.labels)


def test_chat_style_without_a_chat_template_is_refused(causal_lm):
    _, tokenizer = causal_lm
    template = tokenizer.chat_template
    tokenizer.chat_template = None
    try:
        with pytest.raises(ConfigError, match="prompt_style='alpaca'"):
            format_prompt("Classify.", "text", "chat", tokenizer)
    finally:
        tokenizer.chat_template = template


def test_prompt_tokens_carry_no_loss(instruct_config, causal_lm):
    model, tokenizer = causal_lm
    records = to_alpaca(
        pd.DataFrame({"text": ["Stocks fell sharply on Monday.", "Team wins."], "label": [2, 1]}),
        instruct_config.labels,
    )
    example = encode_example(tokenizer, prompts(records)[0], "Business")
    response = tokenizer("Business", add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]
    prompt_length = len(example["input_ids"]) - len(response)
    assert example["labels"][:prompt_length] == [IGNORE_INDEX] * prompt_length
    assert example["labels"][prompt_length:] == response == example["input_ids"][prompt_length:]

    # the model's loss on a padded batch equals the cross-entropy over response and EOS tokens alone
    dataset = instruct_dataset(records, tokenizer)
    batch = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)(
        list(dataset)
    )
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    with torch.no_grad():
        out = model(**batch)
    logits, labels = out.logits[:, :-1].float(), batch["labels"][:, 1:]
    counted = labels != IGNORE_INDEX
    assert counted.sum() == 2 + len(response)  # "Sports" + EOS and "Business" + EOS
    manual = torch.nn.functional.cross_entropy(logits[counted], labels[counted])
    assert torch.allclose(out.loss, manual, atol=1e-5)
    # changing every prompt token's target leaves the loss as it is: they are not counted
    everything = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch["input_ids"][:, 1:].reshape(-1)
    )
    assert not torch.allclose(out.loss, everything)


def test_label_scores_equal_a_full_forward_pass(instruct_config, causal_lm, test_prompts):
    model, tokenizer = causal_lm
    labels = instruct_config.labels
    scores, answers = classify_prompts(
        model, tokenizer, test_prompts[:3], labels, max_new_tokens=6, batch_size=2
    )
    for i, prompt in enumerate(test_prompts[:3]):
        prompt_ids = tokenizer(prompt)["input_ids"]
        for k, name in enumerate(labels):
            label_ids = tokenizer(name, add_special_tokens=False)["input_ids"] + [
                tokenizer.eos_token_id
            ]
            with torch.no_grad():
                logp = torch.log_softmax(
                    model(torch.tensor([prompt_ids + label_ids])).logits[0].float(), dim=-1
                )
            expected = sum(
                logp[len(prompt_ids) - 1 + j, token].item() for j, token in enumerate(label_ids)
            )
            assert abs(scores[i, k] - expected) < 1e-3, (i, name, scores[i, k], expected)
    # the answers are generate()'s own greedy answers, batched or not
    assert answers == generate_answers(
        model, tokenizer, test_prompts[:3], max_new_tokens=6, batch_size=1
    )
    assert np.allclose(
        label_log_likelihoods(model, tokenizer, test_prompts[:3], labels, batch_size=3),
        scores,
        atol=1e-3,
    )


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Sports", 1),
        ("sci/tech.", 3),
        (" Business\n", 2),
        ("This is about World politics", 0),
        ("The article is Sports, not Business", 1),
        ("I cannot tell", -1),
        ("", -1),
    ],
)
def test_parse_label(answer, expected):
    assert parse_label(answer, ["World", "Sports", "Business", "Sci/Tech"]) == expected


def test_merged_and_adapter_generation_agree(instruct_config, test_prompts, tmp_path):
    """A LoRA adapter with random (non-zero) weights: greedy answers must be the same before and
    after merging."""
    from peft import LoraConfig, TaskType, get_peft_model

    config = instruct_config
    base, tokenizer = load_causal_lm(
        config, load_in_4bit=False, dtype=torch.float32, prepare_for_training=False
    )
    torch.manual_seed(0)
    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=8,
        lora_alpha=64,
        target_modules="all-linear",
        init_lora_weights=False,
    )
    model = get_peft_model(base, lora)
    save_adapter(model, tokenizer, config, tmp_path / "adapter")
    del model, base

    adapter_model, tokenizer = load_adapter(
        tmp_path / "adapter", load_in_4bit=False, dtype=torch.float32
    )
    with adapter_model.disable_adapter():
        plain = generate_answers(adapter_model, tokenizer, test_prompts, max_new_tokens=6)
    scores_before, before = classify_prompts(
        adapter_model, tokenizer, test_prompts, config.labels, max_new_tokens=6
    )
    assert before != plain, (
        "the random adapter should change the answers, or the test proves nothing"
    )
    merged = merge(adapter_model)
    scores_after, after = classify_prompts(
        merged, tokenizer, test_prompts, config.labels, max_new_tokens=6
    )
    assert after == before
    assert np.abs(scores_after - scores_before).max() < 1e-3


def test_instruct_cli_writes_a_run_folder_and_predict_scores_labels(tmp_path, run_command):
    settings = {
        "train_per_class": 8,
        "val_per_class": 2,
        "test_per_class": 5,
        "instruct_train_per_class": 0,
        "batch_size": 4,
        "eval_batch_size": 8,
        "save_steps": 1000,
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(settings))
    out = tmp_path / "run"
    train = subprocess.run(
        [
            sys.executable,
            "-m",
            "helpers.train",
            "--profile",
            "smollm2-cpu",
            "--task",
            "instruct",
            "--config",
            str(tmp_path / "tiny.yaml"),
            "--output-dir",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    for name in (
        "config.yaml",
        "metrics.json",
        "baseline.json",
        "test.csv",
        "test_predictions.csv",
        "adapter/adapter_config.json",
        "merged/config.json",
        "merged/course_labels.json",
    ):
        assert (out / name).exists(), name
    assert yaml.safe_load((out / "config.yaml").read_text())["task"] == "instruct"
    assert json.loads((out / "merged" / "course_labels.json").read_text())["task"] == "instruct"
    metrics = json.loads((out / "metrics.json").read_text())
    assert (
        metrics["task"] == "instruct" and metrics["train_rows"] == 32 and metrics["test_rows"] == 20
    )
    for stage in ("baseline", "final"):
        assert set(metrics[stage]) >= {"scored", "generated", "valid_answers", "samples_per_second"}
    assert metrics["merge_check"]["same_answers"] == 1.0
    assert metrics["merge_check"]["max_abs_difference"] < 1e-3
    for stage in ("final", "merged"):  # the trained model, then the merged one: the same keys
        assert set(metrics[stage]) >= {"scored", "generated", "valid_answers"}

    predictions = tmp_path / "predictions.csv"
    predict = run_command(
        "helpers.predict",
        "--model",
        out / "merged",
        "--input",
        out / "test.csv",
        "--output",
        predictions,
    )
    assert predict.returncode == 0, predict.stderr[-3000:]
    table = pd.read_csv(predictions)
    assert len(table) == 20 and set(table["predicted_label"]) <= {
        "World",
        "Sports",
        "Business",
        "Sci/Tech",
    }
    probabilities = table[[c for c in table.columns if c.startswith("prob_")]].to_numpy()
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-3)
    # predict's label scores are the run's own final scores (same merged model, same prompts)
    run_predictions = pd.read_csv(out / "test_predictions.csv")
    assert (
        table["predicted_label"].map({"World": 0, "Sports": 1, "Business": 2, "Sci/Tech": 3})
        == run_predictions["predicted"]
    ).mean() >= 0.95


def test_response_loss_trainer_matches_the_models_own_loss(instruct_config, causal_lm):
    """ResponseLossTrainer sends only the counted positions through the LM head; the loss must not
    change."""
    from helpers.instruct import ResponseLossTrainer
    from helpers.training import training_arguments

    model, tokenizer = causal_lm
    records = to_alpaca(
        pd.DataFrame(
            {
                "text": ["Stocks fell sharply on Monday.", "Team wins.", "New chip."],
                "label": [2, 1, 3],
            }
        ),
        instruct_config.labels,
    )
    batch = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)(
        list(instruct_dataset(records, tokenizer))
    )
    trainer = ResponseLossTrainer(
        model=model, args=training_arguments(instruct_config, "/tmp/unused", eval_strategy="no")
    )
    with torch.no_grad():
        expected = model(**batch).loss
        loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True)
    # "Business", "Sports", "Sci/Tech" (3 tokens), each + EOS
    assert outputs.logits.shape[0] == 2 + 2 + 4
    assert torch.allclose(loss, expected, atol=1e-5)


def test_long_general_records_are_dropped_so_batches_stay_bounded(monkeypatch, capsys):
    from helpers import instruct
    from helpers.modeling import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model("smollm2"))
    general = pd.DataFrame(
        {
            "instruction": ["Name a colour.", "Write an essay."],
            "input": ["", ""],
            "output": ["Blue.", "word " * 2000],
        }
    )
    monkeypatch.setattr(instruct, "general_alpaca_records", lambda rows, seed: general)
    config = load_config("smollm2-cpu", task="instruct", alpaca_general_rows=2, data_source="hub")
    train = pd.DataFrame({"text": ["Stocks rose.", "A late goal."], "label": [2, 1]})
    records = instruct_records(train, config, tokenizer)
    assert "Blue." in set(records["output"]) and len(records) == 3  # two articles, one general
    assert not any(output.startswith("word word") for output in records["output"])
    assert "dropped 1 general records longer than 512 tokens" in capsys.readouterr().out
    lengths = [
        len(encode_example(tokenizer, p, o)["input_ids"])
        for p, o in zip(prompts(records, "alpaca", tokenizer), records["output"], strict=True)
    ]
    assert max(lengths) <= instruct.GENERAL_MAX_TOKENS
