"""helpers.hardware decides device and precision once; the rest of the package asks it."""

import ast
import mmap
import os
from pathlib import Path

import pytest
import torch

from helpers import hardware

REPO = Path(__file__).resolve().parents[1]


def _fake_gpu(monkeypatch, name, capability):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)


def _asks_cuda(source: str) -> bool:
    """Whether code (not a string: the model card's loading code may) calls cuda.is_available."""
    return any(
        isinstance(node, ast.Attribute)
        and node.attr == "is_available"
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "cuda"
        for node in ast.walk(ast.parse(source))
    )


def test_only_the_hardware_module_asks_cuda():
    asking = [
        str(path.relative_to(REPO))
        for path in sorted((REPO / "helpers").glob("*.py"))
        if _asks_cuda(path.read_text())
    ]
    assert asking == ["helpers/hardware.py"]
    assert _asks_cuda("import torch\ntorch.cuda.is_available()")


def test_every_decision_has_a_value_and_a_reason():
    made = hardware.decisions()
    assert set(made) == {
        "device",
        "compute dtype",
        "mixed precision",
        "serving dtype",
        "merge dtype",
        "attention",
        "peak memory",
    }
    for name, (value, reason) in made.items():
        assert value is not None and len(reason) > 10, name
    here = "cuda" if hardware.gpu_available() else "cpu"
    assert made["device"].value == torch.device(here)
    assert made["attention"].value == {"cuda": "sdpa", "cpu": "eager"}[here]
    assert hardware.attention_implementation("sdpa") == ("sdpa", "sdpa: set in the config")


@pytest.mark.parametrize(
    ("name", "capability", "dtype", "flags"),
    [
        ("Tesla T4", (7, 5), torch.float16, {"bf16": False, "fp16": True}),
        ("NVIDIA A100-SXM4-80GB", (8, 0), torch.bfloat16, {"bf16": True, "fp16": False}),
    ],
)
def test_a_gpu_gets_one_consistent_set_of_decisions(monkeypatch, name, capability, dtype, flags):
    _fake_gpu(monkeypatch, name, capability)
    made = hardware.decisions()
    assert made["device"].value == torch.device("cuda", 0) and name in made["device"].reason
    chosen = {made[name].value for name in ("compute dtype", "serving dtype", "merge dtype")}
    assert chosen == {dtype}
    assert made["mixed precision"].value == flags and made["attention"].value == "sdpa"
    assert hardware.hardware_name() == name


def test_device_map_names_the_process_gpu_without_touching_gpu_0(monkeypatch):
    _fake_gpu(monkeypatch, "Tesla T4", (7, 5))

    def no_context(*args):
        raise AssertionError("current_device() opens a CUDA context on GPU 0")

    monkeypatch.setattr(torch.cuda, "current_device", no_context)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert hardware.device_map() == {"": 1}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hardware.device_map() is None


def test_every_gpu_question_names_the_process_gpu(monkeypatch):
    """Process 1 of two (Kaggle's two T4s) asks about GPU 1 only: name, capability, free memory."""
    asked = []

    def record(answer):
        def ask(device=None):
            asked.append(device)
            return answer

        return ask

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", record("Tesla T4"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", record((7, 5)))
    monkeypatch.setattr(torch.cuda, "mem_get_info", record((14 * 2**30, 15 * 2**30)))
    monkeypatch.setattr(
        torch.cuda, "current_device", lambda: pytest.fail("current_device() touches GPU 0")
    )
    monkeypatch.setenv("LOCAL_RANK", "1")
    hardware.decisions()
    hardware.gpu_memory()
    hardware.hardware_name()
    assert hardware.free_memory() == 14 * 2**30  # the GPU's free memory, not the RAM
    assert hardware.device().value == torch.device("cuda", 1)
    assert asked and set(asked) == {1}


def test_free_memory_on_the_cpu_is_the_ram_available():
    free = hardware.free_memory()
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert free is not None and 0 < free <= total


def test_peak_memory_resets_and_grows():
    where = hardware.device().value
    big = torch.ones(256 * 2**20, dtype=torch.uint8, device=where)  # 256 MiB, touched
    peak_with_big = hardware.peak_memory_mb()
    del big
    hardware.reset_peak_memory()
    after_reset = hardware.peak_memory_mb()
    assert after_reset <= peak_with_big - 192  # the block's peak is forgotten
    if hardware.gpu_available():
        block = torch.ones(64 * 2**20, dtype=torch.uint8, device=where)
    else:  # fresh pages: the heap may hold freed memory that is still resident and reused
        block = mmap.mmap(-1, 64 * 2**20)
        block.write(b"\1" * len(block))
    assert hardware.peak_memory_mb() >= after_reset + 48 and len(block) == 64 * 2**20
    assert hardware.peak_memory_kind().value == ("GPU" if hardware.gpu_available() else "RSS")


def _fake_nvidia_smi(monkeypatch, line="Tesla T4, 418.67"):
    import subprocess

    monkeypatch.setattr(hardware.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(
        hardware.subprocess,
        "run",
        lambda *a, **k: subprocess.CompletedProcess(a, 0, line + "\n", ""),
    )


@pytest.mark.parametrize(
    ("cuda", "says"),
    [("12.8", "driver is probably older than that CUDA"), (None, "is a CPU build")],
)
def test_an_nvidia_gpu_torch_cannot_use_is_an_error_not_a_cpu_run(monkeypatch, cuda, says):
    from helpers.config import ConfigError, default_profile

    _fake_nvidia_smi(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.delenv("COURSE_PROFILE", raising=False)
    with pytest.raises(ConfigError) as error:
        default_profile()
    message = str(error.value)
    assert "Tesla T4, 418.67" in message and says in message
    assert "COURSE_PROFILE=smollm2-cpu" in message and "\n" not in message
    # choosing the CPU on purpose still works
    monkeypatch.setenv("COURSE_PROFILE", "smollm2-cpu")
    assert default_profile() == "smollm2-cpu"


def test_no_nvidia_driver_means_the_cpu_quietly(monkeypatch):
    from helpers.config import default_profile

    monkeypatch.setattr(hardware.shutil, "which", lambda name: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("COURSE_PROFILE", raising=False)
    assert hardware.nvidia_driver() is None
    assert default_profile() == "smollm2-cpu"


def test_setup_takes_torch_from_the_cpu_index_without_an_nvidia_gpu():
    makefile = (REPO / "Makefile").read_text()
    assert "command -v nvidia-smi" in makefile
    assert "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in makefile
    # an unreachable CPU index falls back to the default index, after a short timeout
    assert "--retries 0 --timeout 10" in makefile and "|| $(PY) -m pip install" in makefile
