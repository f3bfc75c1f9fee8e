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
from helpers.hardware import compute_dtype, mixed_precision
from helpers.memory import LLAMA3_8B_SHAPE, GiB, estimate_memory, warn_if_too_big
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


def test_too_small_gpu_gets_a_warning_with_the_fix():
    config = load_config("llama3-8b")
    estimate = estimate_memory(config, LLAMA3_8B_SHAPE, bits=4, on_gpu=True)
    assert 4 * GiB < estimate.parameters < 6 * GiB  # 7.0B NF4 weights plus 0.5B 16-bit embeddings
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
        # fits a T4 as configured
        assert warn_if_too_big(config, LLAMA3_8B_SHAPE, 80 * GiB).total < 15 * GiB


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
    assert "assert same and difference <= 1e-3" in evaluation


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


def test_gpu_smoke_script_runs_the_course_code_on_a_tiny_llama(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "scripts/gpu_smoke.py",
            "--tiny",
            "--steps",
            "2",
            "--output",
            str(tmp_path / "smoke.json"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    figures = json.loads((tmp_path / "smoke.json").read_text())
    assert figures["train_tokens_per_second"] > 0 and figures["train_peak_memory_mb"] > 0
    assert figures["eval_logits_finite"] and figures["shape"] == "tiny"
