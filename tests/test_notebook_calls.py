"""The notebooks show the library calls a learner writes; helpers make the same calls for the
commands. These tests run the notebooks' own cells and compare them with the helpers."""

from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import torch

from helpers.evaluation import predict_logits

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
TEXTS = [
    "Oil prices climb as supply tightens",
    "Striker signs for rival club after a record bid",
    "New chip promises faster AI on smartphones",
]


def cell(notebook: str, needle: str) -> str:
    """The source of the one code cell of ``notebook`` that contains ``needle``."""
    cells = [
        c.source
        for c in nbformat.read(NOTEBOOKS / notebook, as_version=4).cells
        if c.cell_type == "code" and needle in c.source
    ]
    assert len(cells) == 1, (notebook, needle, len(cells))
    return cells[0]


def run_cell(notebook: str, needle: str, **names):
    namespace = dict(names)
    exec(compile(cell(notebook, needle), f"{notebook}: {needle}", "exec"), namespace)  # noqa: S102
    return namespace


def test_notebook_03_loads_the_model_as_load_classifier_does(cpu_config):
    from transformers import AutoModelForSequenceClassification

    from helpers.hardware import compute_dtype
    from helpers.modeling import (
        bnb_config,
        keep_4bit_layers_trainable,
        load_classifier,
        memory_footprint_mb,
        resolve_model,
    )

    quantization = bnb_config()
    ns = run_cell(
        "03_loading_in_4bit.ipynb",
        "AutoModelForSequenceClassification.from_pretrained(",
        config=cpu_config,
        quantization=quantization,
        path=resolve_model(cpu_config.model_name),
        footprint={},
        torch=torch,
        compute_dtype=compute_dtype,
        memory_footprint_mb=memory_footprint_mb,
        AutoModelForSequenceClassification=AutoModelForSequenceClassification,
    )
    model, tokenizer = load_classifier(
        cpu_config, quantization_config=quantization, prepare_for_training=False
    )
    shown, shown_tokenizer = ns["model"], ns["tokenizer"]
    # the one line the helper adds: on CPUs with AVX512-BF16 it keeps bitsandbytes' training
    # layout for evaluation too (its bf16 inference kernel differs by about 1e-2)
    keep_4bit_layers_trainable(shown)
    assert shown.config.pad_token_id == model.config.pad_token_id == tokenizer.pad_token_id
    assert shown_tokenizer.pad_token_id == tokenizer.pad_token_id
    assert shown_tokenizer.padding_side == tokenizer.padding_side == "right"
    assert shown.config.id2label == model.config.id2label
    assert shown.get_memory_footprint() == model.get_memory_footprint()
    assert torch.equal(shown.score.weight, model.score.weight)  # the same seeded head
    a = predict_logits(shown, shown_tokenizer, TEXTS, progress=False)
    b = predict_logits(model, tokenizer, TEXTS, progress=False)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_notebook_05s_evaluation_loop_is_evaluate_classifier(cpu_config):
    from helpers.evaluation import evaluate_classifier
    from helpers.modeling import load_classifier

    model, tokenizer = load_classifier(cpu_config, prepare_for_training=False)
    test = pd.DataFrame({"text": TEXTS * 3 + ["A"], "label": [2, 1, 3] * 3 + [0]})
    ns = run_cell(
        "05_baseline.ipynb",
        "chunks.append(model(",
        config=cpu_config.replace(eval_batch_size=4),
        model=model,
        tokenizer=tokenizer,
        test=test,
    )
    expected = evaluate_classifier(model, tokenizer, test, 4, cpu_config.max_length, False)
    np.testing.assert_allclose(ns["baseline"]["logits"], expected["logits"], atol=1e-5)
    assert (ns["baseline"]["predictions"] == expected["predictions"]).all()
    assert ns["baseline"]["metrics"] == expected["metrics"]


def test_notebook_06s_training_arguments_are_training_arguments(cpu_config, tmp_path):
    from helpers.training import training_arguments

    ns = run_cell(
        "06_training.ipynb", "args = TrainingArguments(", config=cpu_config, output_dir=tmp_path
    )
    shown = ns["args"].to_dict()
    expected = training_arguments(cpu_config, tmp_path / "checkpoints").to_dict()
    assert shown == expected


def test_notebook_07_reloads_the_adapter_as_load_adapter_does(default_run, cpu_config):
    from helpers.merging import load_adapter

    adapter = default_run["dir"] / "adapter"
    test = default_run["test"].head(8)
    ns = run_cell(
        "07_evaluation_and_merging.ipynb",
        "PeftModel.from_pretrained(base, adapter_dir).eval()",
        config=cpu_config,
        adapter_dir=adapter,
        test=test,
    )
    model, tokenizer = load_adapter(adapter, load_in_4bit=True)
    expected = predict_logits(model, tokenizer, test["text"], max_length=96, progress=False)
    np.testing.assert_allclose(ns["trained"]["logits"], expected, atol=1e-5)
