"""The GPU path, checked where a CPU can check it: memory estimate, precision, workflows, DDP,
smoke."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch
import yaml

from helpers.config import PROFILES, load_config
from helpers.hardware import RUNTIMES, compute_dtype, mixed_precision
from helpers.memory import (
    ANSWER_TOKENS,
    GENERAL_PROMPT_TOKENS,
    LLAMA3_8B_SHAPE,
    PROMPT_TEMPLATE_TOKENS,
    GiB,
    estimate_memory,
    evaluation_bytes,
    gradient_checkpointing,
    kv_cache_bytes,
    warn_if_too_big,
)
from helpers.modeling import load_classifier

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p.name for p in (REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize(
    ("bits", "dtype"), [(32, torch.float32), (16, torch.bfloat16), (4, torch.float32)]
)
def test_memory_estimate_within_15_percent_of_the_loaded_footprint(cpu_config, bits, dtype):
    model, _ = load_classifier(
        cpu_config, load_in_4bit=bits == 4, dtype=dtype, prepare_for_training=False
    )
    measured = model.get_memory_footprint()
    estimate = estimate_memory(
        cpu_config, model.config, bits=bits, dtype=dtype, training=False, on_gpu=False
    )
    assert abs(estimate.parameters - measured) / measured <= 0.15, (
        bits,
        estimate.parameters,
        measured,
    )


def test_memory_estimate_counts_the_fp32_casts_of_a_model_prepared_for_training(cpu_config):
    """prepare_model_for_kbit_training casts every weight that is not 4-bit to fp32."""
    model, _ = load_classifier(cpu_config, load_in_4bit=True, dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.float32
    measured = model.get_memory_footprint()
    estimate = estimate_memory(cpu_config, model.config, bits=4, dtype=torch.bfloat16, on_gpu=False)
    assert abs(estimate.parameters - measured) / measured <= 0.15, (estimate.parameters, measured)


def _cpu_step_memory():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import cpu_step_memory
    finally:
        sys.path.remove(str(REPO / "scripts"))
    return cpu_step_memory


@pytest.mark.parametrize(
    "case", _cpu_step_memory().cases(), ids=lambda c: "-".join(str(v) for v in c.values())
)
def test_memory_estimate_within_15_percent_of_a_training_step_measured_on_the_cpu(case):
    """SmolLM2 prepared for training, one step (forward, backward, optimizer) on the longest batch:
    the model, the optimizer's state and the most tensor bytes alive at once, against the estimate
    of the same (scripts/cpu_step_memory.py, docs/performance.md)."""
    row = _cpu_step_memory().measure(**case)
    assert abs(row["ratio"] - 1) <= 0.15, row
    # the step's working set dominates, so the agreement is not the weights' alone
    assert row["step_peak_mib"] > 0.3 * row["measured_mib"], row


@pytest.mark.parametrize(
    "measured",
    sorted((REPO / "benchmarks" / "results").glob("*/smoke_*.json")),
    ids=lambda p: p.stem,
)
def test_memory_estimate_within_15_percent_of_the_peaks_measured_on_a_gpu(measured):
    """The Llama 3 8B training peaks measured by scripts/gpu_smoke.py (docs/performance.md)."""
    figures = json.loads(measured.read_text())
    config = load_config(
        "llama3-8b",
        batch_size=figures["batch_size"],
        max_length=figures["max_length"],
        gradient_checkpointing=figures["gradient_checkpointing"],
    )
    estimate = estimate_memory(config, LLAMA3_8B_SHAPE, bits=4, on_gpu=True).training / 2**20
    peak = figures["train_peak_memory_mb"]
    assert abs(estimate - peak) / peak <= 0.15, (estimate, peak)


def test_the_estimate_says_no_where_a_gpu_ran_out_of_memory():
    """As a T4 (a 15 GB cap), batch 64 with checkpointing and batch 8 without ran out of memory
    (benchmarks/results/2026-11-25-h100/out_of_memory.txt); batch 32 with checkpointing fit."""

    def needs(batch_size, checkpointing):
        config = load_config(
            "llama3-8b", batch_size=batch_size, gradient_checkpointing=checkpointing
        )
        return estimate_memory(config, LLAMA3_8B_SHAPE, bits=4, on_gpu=True).training

    cap = 0.9 * T4_BYTES
    assert needs(64, True) > cap and needs(8, False) > cap
    assert needs(32, True) < cap


def test_the_instruct_estimate_counts_the_language_model_head():
    classify = estimate_memory(load_config("llama3-8b"), LLAMA3_8B_SHAPE, on_gpu=True)
    instruct = estimate_memory(load_config("llama3-8b", task="instruct"), LLAMA3_8B_SHAPE)
    head = LLAMA3_8B_SHAPE["vocab_size"] * LLAMA3_8B_SHAPE["hidden_size"] * 4  # fp32 after prepare
    assert instruct.parameters - classify.parameters == pytest.approx(head, rel=0.01)


def test_too_small_gpu_gets_a_warning_with_the_fix():
    config = load_config("llama3-8b")
    estimate = estimate_memory(config, LLAMA3_8B_SHAPE, bits=4, on_gpu=True)
    assert 5 * GiB < estimate.parameters < 6 * GiB  # 7.0B NF4 weights plus 0.5B fp32 embeddings
    with pytest.warns(
        UserWarning,
        match="will likely run out of memory.*gradient_checkpointing=True.*batch_size=16",
    ):
        warn_if_too_big(
            config.replace(gradient_checkpointing=False, batch_size=32), LLAMA3_8B_SHAPE, 15 * GiB
        )
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # as configured ("auto" checkpointing) it fits a T4, and an 80 GB GPU without checkpointing
        assert warn_if_too_big(config, LLAMA3_8B_SHAPE, T4_BYTES).total < 0.9 * T4_BYTES
        assert warn_if_too_big(config, LLAMA3_8B_SHAPE, 80 * GiB).total > 0.9 * T4_BYTES


T4_BYTES = 15 * 10**9


@pytest.mark.parametrize("task", ["classify", "instruct"])
def test_gradient_checkpointing_is_on_only_where_the_run_would_not_fit_without_it(task):
    config = load_config("llama3-8b", task=task)
    assert config.gradient_checkpointing == "auto"
    t4 = gradient_checkpointing(config, LLAMA3_8B_SHAPE, T4_BYTES)
    big = gradient_checkpointing(config, LLAMA3_8B_SHAPE, 80 * GiB)
    assert t4.value is True and "needed" in t4.reason
    assert big.value is False and "not needed" in big.reason
    for free, decision in ((T4_BYTES, t4), (80 * GiB, big)):
        estimate = estimate_memory(
            config, LLAMA3_8B_SHAPE, on_gpu=True, checkpointing=decision.value
        )
        assert estimate.total <= 0.9 * free, (task, free, estimate.gib())
    without = estimate_memory(config, LLAMA3_8B_SHAPE, on_gpu=True, checkpointing=False)
    assert without.total > 0.9 * T4_BYTES  # measured: batch 8 without it ran out of memory
    # a setting of True or False is obeyed, whatever the memory
    assert (
        gradient_checkpointing(
            config.replace(gradient_checkpointing=False), LLAMA3_8B_SHAPE, T4_BYTES
        ).value
        is False
    )
    assert (
        gradient_checkpointing(
            config.replace(gradient_checkpointing=True), LLAMA3_8B_SHAPE, 80 * GiB
        ).value
        is True
    )


def test_the_small_models_train_without_checkpointing_on_the_cpu(cpu_config):
    from transformers import AutoConfig

    from helpers.modeling import llama3_tiny

    tiny = load_config("llama3-tiny")
    assert gradient_checkpointing(tiny, AutoConfig.from_pretrained(llama3_tiny())).value is False
    model, _ = load_classifier(cpu_config)
    assert gradient_checkpointing(cpu_config, model.config).value is False
    assert not model.is_gradient_checkpointing  # the loader applied the decision


def test_the_key_value_cache_term_is_the_size_of_the_cache_a_forward_pass_keeps(cpu_config):
    model, tokenizer = load_classifier(
        cpu_config, load_in_4bit=False, dtype=torch.float32, prepare_for_training=False
    )
    batch = tokenizer(
        ["Stocks rallied on Friday.", "A long match went to penalties."],
        padding=True,
        return_tensors="pt",
    )
    with torch.inference_mode():
        cache = model.model(**batch, use_cache=True).past_key_values
    kept = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    tokens = batch["input_ids"].numel()
    assert kept == kv_cache_bytes(model.config, tokens, element=4)


def test_the_prompt_and_answer_token_budgets_hold_for_both_tokenizers(cpu_config):
    from helpers.instruct import ALPACA_PROMPT_NO_INPUT, article_prompts, encode_example
    from helpers.modeling import llama3_tokenizer, load_tokenizer, resolve_model

    for tokenizer in (load_tokenizer(resolve_model("smollm2")), load_tokenizer(llama3_tokenizer())):
        article = "word " * 400  # cut to max_length tokens by the prompt builder
        prompt = article_prompts([article], cpu_config, tokenizer)[0]
        for label in cpu_config.labels:
            example = encode_example(tokenizer, prompt, label)
            answer = sum(1 for x in example["labels"] if x != -100)
            assert answer <= ANSWER_TOKENS, (label, answer)
            assert len(example["input_ids"]) - answer <= (
                cpu_config.max_length + PROMPT_TEMPLATE_TOKENS
            )
        # a general record's prompt is at least the template: its answer is at most the rest
        general = encode_example(tokenizer, ALPACA_PROMPT_NO_INPUT.format(instruction=""), "x")
        prompt_tokens = sum(1 for x in general["labels"] if x == -100)
        assert prompt_tokens >= GENERAL_PROMPT_TOKENS, prompt_tokens


def test_general_answers_through_the_head_set_the_instruct_batch_for_a_t4():
    """General Alpaca answers run up to ~490 tokens, each through the 128k-word head: 8 rows a step
    would not fit a T4; the profile's 2 rows, four times, do (the same 8 rows an update)."""
    config = load_config("llama3-8b", task="instruct")
    assert (config.batch_size, config.gradient_accumulation_steps) == (2, 4)
    fits = estimate_memory(config, LLAMA3_8B_SHAPE, on_gpu=True, checkpointing=True)
    eight = config.replace(batch_size=8, gradient_accumulation_steps=1)
    too_big = estimate_memory(eight, LLAMA3_8B_SHAPE, on_gpu=True, checkpointing=True)
    assert fits.total <= 0.9 * T4_BYTES < too_big.total
    without_general = estimate_memory(
        eight.replace(alpaca_general_rows=0), LLAMA3_8B_SHAPE, on_gpu=True, checkpointing=True
    )
    assert too_big.activations - without_general.activations > 3 * GiB


def test_label_scoring_sets_the_instruct_peak_and_its_batch_fits_a_t4():
    """Label scoring keeps each prompt's cache once per label: at the classifier's evaluation
    batch of 64 the instruct run would not fit a T4; the profile's 8 does."""
    config = load_config("llama3-8b", task="instruct")
    assert config.eval_batch_size == 8
    fits = estimate_memory(config, LLAMA3_8B_SHAPE, on_gpu=True, checkpointing=True)
    too_big = estimate_memory(
        config.replace(eval_batch_size=64), LLAMA3_8B_SHAPE, on_gpu=True, checkpointing=True
    )
    assert fits.total <= 0.9 * T4_BYTES < too_big.total
    assert too_big.evaluation > too_big.activations
    with pytest.warns(UserWarning, match="eval_batch_size=32"):
        warn_if_too_big(config.replace(eval_batch_size=64), LLAMA3_8B_SHAPE, T4_BYTES)


@pytest.mark.parametrize(
    ("name", "capability", "dtype"),
    [
        ("Tesla T4", (7, 5), torch.float16),
        ("Tesla P100-PCIE-16GB", (6, 0), torch.float16),
        ("NVIDIA A100-SXM4-40GB", (8, 0), torch.bfloat16),
        ("NVIDIA H100 80GB HBM3", (9, 0), torch.bfloat16),
    ],
)
def test_precision_per_gpu_with_its_reason(monkeypatch, name, capability, dtype):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    # what torch says even on a T4
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    chosen, reason = compute_dtype()
    assert chosen == dtype and name in reason
    assert mixed_precision().value == {
        "bf16": dtype == torch.bfloat16,
        "fp16": dtype == torch.float16,
    }


def test_cpu_precision_is_fp32():
    assert compute_dtype().value == torch.float32 and "CPU" in compute_dtype().reason


def _workflow(name):
    data = yaml.safe_load((REPO / ".github" / "workflows" / name).read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as True
    for job in data["jobs"].values():
        assert job["runs-on"] and job["steps"]
        for step in job["steps"]:
            assert ("uses" in step) != ("run" in step), step
    return data


def test_gpu_workflow_runs_every_notebook_on_a_gpu_profile_with_the_token_secret():
    data = _workflow("gpu-notebooks.yml")
    assert data["on"] and "workflow_dispatch" in data["on"]
    job = data["jobs"]["notebooks"]
    assert "gpu" in job["runs-on"] and "self-hosted" in job["runs-on"]
    profile = PROFILES[job["env"]["COURSE_PROFILE"]]
    assert profile.for_gpu
    if profile.needs_hub_login:
        assert job["env"]["HF_TOKEN"] == "${{ secrets.HF_TOKEN }}"
    command = next(step["run"] for step in job["steps"] if "nbval" in step.get("run", ""))
    assert "--nbval-lax" in command
    assert (
        sorted(Path(word).name for word in command.split() if word.endswith(".ipynb")) == NOTEBOOKS
    )
    assert any("gpu_smoke.py" in step.get("run", "") for step in job["steps"])


def test_cpu_workflow_runs_what_ci_runs():
    data = _workflow("cpu.yml")
    runs = [step.get("run", "") for job in data["jobs"].values() for step in job["steps"]]
    assert "bash .ci/run" in runs
    assert "make test" in (REPO / ".ci" / "run").read_text()


def _code(notebook):
    return "\n".join(
        c.source
        for c in nbformat.read(REPO / "notebooks" / notebook, as_version=4).cells
        if c.cell_type == "code"
    )


def test_notebooks_carry_the_assertions_the_gpu_job_relies_on():
    assert 'assert baseline["metrics"]["accuracy"] < 0.5' in _code("05_baseline.ipynb")
    assert "assert val_accuracy > 0.7" in _code("06_training.ipynb")
    evaluation = _code("07_evaluation_and_merging.ipynb")
    assert 'assert trained["metrics"]["accuracy"] - baseline["accuracy"] >= 0.3' in evaluation
    # the merge check by precision (a bf16 merge on a GPU is never within fp32's 1e-3)
    assert 'assert check["passed"], check' in evaluation
    assert "merge_check(" in evaluation and "1e-3" not in evaluation
    assert 'assert check["passed"], check' in _code("08_instruction_tuning.ipynb")


def test_two_process_data_parallel_training_on_the_cpu(tmp_path):
    (tmp_path / "tiny.yaml").write_text(
        "train_per_class: 16\nval_per_class: 4\ntest_per_class: 10\nmax_length: 48\n"
        "logging_steps: 1\n"
    )
    env = {**os.environ, "COURSE_PROFILE": "smollm2-cpu"}
    # `--multi_gpu` is accelerate's torchrun launcher; without a GPU it runs DDP over gloo on the
    # CPU (`--cpu --num_processes 2` would start ONE process unless mpirun is set up: accelerate
    # 1.15 launch.py)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "helpers.train",
            "--config",
            str(tmp_path / "tiny.yaml"),
            "--output-dir",
            str(tmp_path / "run"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["processes"] == 2
    assert metrics["final"]["accuracy"] > metrics["baseline"]["accuracy"]
    assert (tmp_path / "run" / "merged" / "model.safetensors").is_file()


def _script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )


def test_gpu_measurement_scripts_run_the_course_code_on_a_tiny_llama(tmp_path):
    """The scripts that measured the GPU path (docs/performance.md) still run, here on the CPU."""
    result = _script(
        "scripts/gpu_smoke.py",
        "--tiny",
        "--steps",
        "2",
        "--model-dir",
        str(tmp_path / "model"),
        "--save-adapter",
        str(tmp_path / "adapter"),
        "--output",
        str(tmp_path / "smoke.json"),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    figures = json.loads((tmp_path / "smoke.json").read_text())
    assert figures["train_tokens_per_second"] > 0 and figures["train_peak_memory_mb"] > 0
    assert figures["eval_logits_finite"] and figures["shape"] == "tiny"
    assert figures["first_step_seconds"] > 0 and figures["steady_tokens_per_second"] > 0
    assert (tmp_path / "adapter" / "course_labels.json").is_file()

    result = _script(
        "scripts/gpu_merge.py",
        str(tmp_path / "adapter"),
        str(tmp_path / "merged"),
        "--output",
        str(tmp_path / "merge.json"),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    merge = json.loads((tmp_path / "merge.json").read_text())
    assert merge["merge_and_save"]["error"] is None
    assert merge["merge_and_save"]["peak_rss_mb"] > 0
    assert merge["merge_check"]["same_predictions"] == 1.0  # fp32 on the CPU
    assert merge["load_for_inference"]["error"] is None


def test_as_t4_needs_a_gpu():
    result = _script("scripts/as_t4.py", "-m", "helpers.train", "--help")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == ["as_t4 needs an NVIDIA GPU: there is none here."]


def test_instruct_counts_the_heads_16bit_copy_and_evaluates_in_fp32():
    """Under fp16 autocast the untied fp32 head is copied to 16 bits for the backward pass (1 GB at
    the 8B shape), and after training (no autocast) label scoring's cache and logits are fp32: with
    both, the former 4 x 2 batch needs about 13.3 GiB, above 90% of a T4's 14.5 GiB free."""
    config = load_config("llama3-8b", task="instruct")
    tied = {**LLAMA3_8B_SHAPE, "tie_word_embeddings": True}
    untied = estimate_memory(config, LLAMA3_8B_SHAPE, on_gpu=True, checkpointing=True)
    shared = estimate_memory(config, tied, on_gpu=True, checkpointing=True)
    head = LLAMA3_8B_SHAPE["vocab_size"] * LLAMA3_8B_SHAPE["hidden_size"]
    assert untied.activations - shared.activations == head * 2
    assert untied.evaluation == evaluation_bytes(config, LLAMA3_8B_SHAPE, 4)
    former = config.replace(batch_size=4, gradient_accumulation_steps=2, eval_batch_size=16)
    needs = estimate_memory(former, LLAMA3_8B_SHAPE, on_gpu=True, checkpointing=True).total
    free = RUNTIMES["t4"].gpu_free
    assert 13.2 * GiB < needs and needs > 0.9 * free >= untied.total
