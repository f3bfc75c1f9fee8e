"""The Llama 3 8B path on a free Colab T4, proven on the CPU: under ``COURSE_SIMULATE_GPU=t4`` the
commands run ``llama3-tiny`` while a ledger counts every model at the 8B shape
(helpers/simulated_gpu.py). The chapter notebooks run the same way in ``make test`` (nbval-lax)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest

from helpers.hardware import RUNTIMES
from helpers.memory import storage_plan

REPO = Path(__file__).resolve().parents[1]
T4 = RUNTIMES["t4"]


def _python(code: str, simulate: str | None = "t4", timeout: int = 600, **env: str):
    environment = {**os.environ, "COURSE_PROFILE": "llama3-tiny", **env}
    environment.pop("COURSE_SIMULATE_GPU", None)
    if simulate:
        environment["COURSE_SIMULATE_GPU"] = simulate
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def t4_runs(tmp_path_factory):
    """`python -m helpers.train` for both tasks on llama3-tiny under the simulated T4."""
    runs = {}
    for task in ("classify", "instruct"):
        out = tmp_path_factory.mktemp("t4") / task
        result = _python(
            f"import sys; from helpers.train import main; sys.exit(main(['--task', '{task}', "
            f"'--output-dir', r'{out}']))"
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        runs[task] = {"dir": out, "stdout": result.stdout}
    return runs


@pytest.mark.parametrize("task", ["classify", "instruct"])
def test_train_fits_a_simulated_t4_and_serves_the_adapter(t4_runs, task):
    run = t4_runs[task]
    metrics = json.loads((run["dir"] / "metrics.json").read_text())
    assert metrics["hardware"].startswith("a free Colab T4, simulated on")
    # the 4-bit model, LoRA and the step's working set at the 8B shape, within the T4's free memory
    assert 5 * 2**30 < metrics["peak_memory_mb"] * 2**20 <= T4.gpu_free
    # the merged model (15-16 GB in fp16) does not fit: checked layer by layer, the adapter serves
    assert metrics["served"] == "adapter"
    assert metrics["merge_check"]["passed"] and metrics["merge_check"]["layers"] == 2 * 7
    assert metrics["merged"] == metrics["final"]
    assert "does not fit this GPU" in run["stdout"]


@pytest.mark.parametrize("task", ["classify", "instruct"])
def test_predict_on_a_simulated_t4_serves_the_adapter_in_place_of_the_merged_model(
    t4_runs, task, tmp_path
):
    run = t4_runs[task]["dir"]
    output = tmp_path / "predictions.csv"
    result = _python(
        "import sys; from helpers.predict import main; sys.exit(main(['--model', "
        f"r'{run / 'merged'}', '--input', r'{run / 'test.csv'}', '--output', r'{output}', "
        "'--dtype', 'float16']))"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "does not fit this GPU" in result.stdout and "serving" in result.stdout
    assert len(output.read_text().splitlines()) == 1 + 16  # llama3-tiny: 4 test rows a class


def test_two_merged_classifiers_do_not_fit_and_a_freed_one_leaves(t4_runs):
    """The simulation can fail: the merged classifier (15 GB at the 8B shape in fp16) fits a T4
    alone, not twice; freed, it leaves the ledger; in RAM (12.7 GB) it does not fit either. The
    course's loader refuses it before loading, naming the size, not "damaged files"."""
    merged = t4_runs["classify"]["dir"] / "merged"
    result = _python(
        f"""
        import gc, torch
        from transformers import AutoModelForSequenceClassification as Auto
        from helpers.merging import load_for_inference
        from helpers.modeling import ModelError
        first = Auto.from_pretrained(r'{merged}', dtype=torch.float16)
        try:
            second = Auto.from_pretrained(r'{merged}', dtype=torch.float16)
        except torch.OutOfMemoryError as error:
            print('OOM:', error)
        del first
        gc.collect()
        again = Auto.from_pretrained(r'{merged}', dtype=torch.float16)
        print('freed: loaded again')
        del again
        try:
            Auto.from_pretrained(r'{merged}', dtype=torch.float16, device_map='cpu')
        except MemoryError as error:
            print('RAM:', error)
        try:
            load_for_inference(r'{merged}')
        except ModelError as error:
            print('course:', error)
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    oom = next(line for line in lines if line.startswith("OOM:"))
    assert "2 model(s) held" in oom and "14.5 GiB free" in oom
    assert "freed: loaded again" in lines
    assert any(line.startswith("RAM:") and "12.7 GB" in line for line in lines)
    course = next(line for line in lines if line.startswith("course:"))
    assert "does not fit this GPU" in course and "adapter/" in course
    assert "damaged" not in course


def test_a_training_step_past_the_t4_raises_out_of_memory():
    """Batch 64 of 128 tokens without gradient checkpointing: about 70 GiB of activations at the
    8B shape (docs/performance.md: batch 8 without it already ran out of memory as a T4)."""
    result = _python(
        """
        import torch
        from helpers.config import load_config
        from helpers.modeling import add_lora, load_classifier
        config = load_config('llama3-tiny', gradient_checkpointing=False)
        model, _ = load_classifier(config)
        model = add_lora(model, config)
        model.train()
        ids = torch.ones(64, 128, dtype=torch.long)
        try:
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
        except torch.OutOfMemoryError as error:
            print('OOM:', error)
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OOM: simulated a free Colab T4: a training step needs about" in result.stdout


def test_a_run_killed_during_its_merge_keeps_a_complete_metrics_file(tmp_path):
    """metrics.json is written before the merge: a full disk or a kill there loses no record."""
    out = tmp_path / "run"
    result = _python(
        f"""
        import os, signal
        import helpers.merging as merging
        def killed(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        merging.stream_merge = killed
        from helpers.train import main
        main(['--output-dir', r'{out}'])
        """,
        simulate=None,
    )
    assert result.returncode == -9, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["merged"] is None  # the merge had not finished
    for key in ("baseline", "final", "train_seconds", "train_loss", "trainable_parameters"):
        assert metrics[key] is not None, key
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert not (out / "merged").exists()


@pytest.mark.parametrize(
    ("modules", "env", "expected"),
    [
        ("ipykernel", {}, "0"),  # a notebook: one GPU, set before torch starts
        ("", {}, None),  # a command: both GPUs (accelerate launch)
        ("ipykernel", {"LOCAL_RANK": "1"}, None),  # a process of accelerate launch
        ("ipykernel", {"CUDA_VISIBLE_DEVICES": "1"}, "1"),  # the learner's own choice
        ("ipykernel torch", {}, None),  # too late: torch started already
    ],
)
def test_a_notebook_uses_one_of_kaggles_two_gpus(modules, env, expected):
    stubs = "".join(
        f"sys.modules['{name}'] = types.ModuleType('{name}'); " for name in modules.split()
    )
    show = "print(os.environ.get('CUDA_VISIBLE_DEVICES'))"
    code = f"import os, sys, types; {stubs}import helpers; {show}"
    clean = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "LOCAL_RANK")}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(expected)


def test_the_storage_plan_fits_drive_and_kaggle():
    """What notebook 00 prints: the outputs folder keeps what is small (adapters, the last
    checkpoints); merged models and the download go to the runtime's local disk."""
    plan = storage_plan()
    outputs = sum(row["bytes"] for row in plan if row["where"] == "outputs")
    assert outputs < 0.25 * T4.outputs_quota  # Drive's 15 GB is shared with the learner's files
    assert outputs < RUNTIMES["kaggle"].outputs_quota
    large = {row["what"]: row["bytes"] for row in plan if row["where"] == "local disk"}
    assert large["merged/ (fp16)"] > 14e9 and large["instruct/merged/ (fp16)"] > 16e9


def test_each_chapter_quotes_its_t4_estimate_from_the_docs():
    """One source: docs/performance.md's table; scripts/execute_notebooks.py copies each row."""
    spec = importlib.util.spec_from_file_location(
        "execute_notebooks", REPO / "scripts" / "execute_notebooks.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    estimates = script.t4_estimates()
    chapters = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert sorted(estimates) == [path.stem for path in chapters]
    for path in chapters:
        header = nbformat.read(path, as_version=4).cells[0].source
        assert script.t4_line(path.stem, estimates) in header, path.name
    readme = (REPO / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| about (an estimate) |"))
    assert [cell.strip() for cell in row.split("|")[2:-1]] == list(estimates.values())


def test_kaggle_is_simulated_with_its_own_ram(t4_runs):
    """COURSE_SIMULATE_GPU=kaggle: the same T4 per notebook, 29 GB of RAM, where the merged
    classifier held in RAM (15 GB at the 8B shape) fits, as it does not on Colab's 12.7 GB."""
    merged = t4_runs["classify"]["dir"] / "merged"
    result = _python(
        f"""
        import torch
        from transformers import AutoModelForSequenceClassification as Auto
        from helpers.hardware import gpu_memory, hardware_name
        print(hardware_name().split(',')[0], round(gpu_memory()[0] / 2**30, 1))
        Auto.from_pretrained(r'{merged}', dtype=torch.float16, device_map='cpu')
        print('in RAM: fits')
        """,
        simulate="kaggle",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == ["Kaggle's two T4s 14.5", "in RAM: fits"]
