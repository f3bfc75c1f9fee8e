"""Where the course runs and in what precision: every such decision is made here, once.

Taught in notebook 00 (setup), which prints each decision with its reason; everything else in the
course asks this module instead of asking torch. Each decision returns a ``Decision``: the value and
the reason, so that what the code does and what the notebook says cannot drift apart.

    from helpers.hardware import compute_dtype
    dtype = compute_dtype().value  # torch.bfloat16 on an A100, float16 on a T4, float32 on a CPU
    print(compute_dtype().reason)
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import subprocess
from pathlib import Path
from typing import Any, NamedTuple

import torch


class Decision(NamedTuple):
    """A choice the course made for this machine, and why."""

    value: Any
    reason: str


# ---------------------------------------------------------------- a simulated runtime
SIMULATE_ENV_VAR = "COURSE_SIMULATE_GPU"


class Runtime(NamedTuple):
    """A hosted GPU runtime as a learner gets it: what a simulated run must fit in."""

    name: str
    gpus: int
    gpu_total: int  # bytes torch reports as the GPU's total
    gpu_free: int  # bytes free once CUDA has started
    ram: int
    outputs_quota: int  # the storage that outlives the session (Drive, /kaggle/working)
    outputs_place: str


T4_TOTAL = 15_835_660_288  # torch.cuda.mem_get_info's total on a T4 (16 GB less ECC)
# Colab's free T4 and Kaggle's two, as docs/performance.md describes them
RUNTIMES = {
    "t4": Runtime(
        "a free Colab T4",
        1,
        T4_TOTAL,
        int(14.5 * 2**30),
        12_700_000_000,
        15 * 10**9,
        "Google Drive (15 GB in all on the free plan)",
    ),
    "kaggle": Runtime(
        "Kaggle's two T4s",
        2,
        T4_TOTAL,
        int(14.5 * 2**30),
        29 * 10**9,
        20 * 10**9,
        "/kaggle/working (20 GB)",
    ),
}
# the simulated GPU's ledger (``helpers.simulated_gpu.Ledger``: ``gpu_bytes()``, ``peak``), set when
# the simulation starts
simulated_gpu: Any = None


def simulated_runtime() -> Runtime | None:
    """The runtime ``COURSE_SIMULATE_GPU`` names (``t4``, ``kaggle``), or None: tensors stay on the
    CPU, while memory questions and precision decisions are answered as that runtime's GPU would
    answer them (``helpers.simulated_gpu`` counts what it would hold)."""
    name = os.environ.get(SIMULATE_ENV_VAR, "").strip().lower()
    if not name or gpu_available():  # a real GPU answers for itself
        return None
    if name not in RUNTIMES:
        raise ValueError(
            f"{SIMULATE_ENV_VAR}={name!r} is not a runtime the course simulates: use one of "
            f"{sorted(RUNTIMES)}, or unset it."
        )
    return RUNTIMES[name]


# ---------------------------------------------------------------- what the machine has
def gpu_available() -> bool:
    """True when PyTorch can use an NVIDIA GPU (the only place the course asks CUDA)."""
    return torch.cuda.is_available()


def on_gpu() -> bool:
    """True where the run's memory and precision are a GPU's: a real one, or a simulated one."""
    return gpu_available() or simulated_runtime() is not None


def gpu_index() -> int:
    """This process's GPU: ``LOCAL_RANK`` under ``accelerate launch`` or ``torchrun`` (read first,
    so that process 1 of Kaggle's two T4s never opens a CUDA context on GPU 0), else the current
    device."""
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    return torch.cuda.current_device()


def nvidia_driver() -> str | None:
    """``nvidia-smi``'s GPU name and driver version, or None where there is no NVIDIA driver."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = result.stdout.strip().splitlines()
    return lines[0].strip() if result.returncode == 0 and lines else None


def check_gpu_usable() -> None:
    """Raise ``ConfigError`` where an NVIDIA GPU is present but PyTorch cannot use it, instead of
    silently training on the CPU: a CPU build of torch, or a driver too old for torch's CUDA."""
    if gpu_available():
        return
    driver = nvidia_driver()
    if driver is None:
        return
    from helpers.config import ConfigError

    if torch.version.cuda is None:
        problem = f"torch {torch.__version__} is a CPU build"
        fix = "install torch's CUDA build (`pip install torch==2.13.0` from the default index)"
    else:
        problem = (
            f"torch {torch.__version__} (built for CUDA {torch.version.cuda}) cannot use it; the "
            "driver is probably older than that CUDA needs"
        )
        fix = "update the NVIDIA driver or install a torch built for an older CUDA"
    raise ConfigError(
        f"This machine has an NVIDIA GPU ({driver}) but {problem}. Fix: {fix}; or choose the CPU "
        "on purpose with COURSE_PROFILE=smollm2-cpu."
    )


def gpu_has_fast_bf16() -> bool:
    """True on Ampere and newer GPUs (compute capability 8.0+: A100, H100, L4, RTX 30xx and later).

    Not ``torch.cuda.is_bf16_supported()``: it also answers True on a T4, where bf16 is emulated and
    slow.
    """
    return gpu_available() and torch.cuda.get_device_capability(gpu_index())[0] >= 8


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 instructions (AVX512-BF16 or AMX)."""
    return bool(
        getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    )


def hardware_name() -> str:
    """What a measurement ran on: the GPU's name, or the CPU's model name, its vector instructions
    (``AVX2``, ``AVX512``), whether bf16 is native, and the number of threads."""
    if gpu_available():
        return torch.cuda.get_device_name(gpu_index())
    runtime = simulated_runtime()
    if runtime is not None:
        return f"{runtime.name}, simulated on {cpu_name()}"
    return cpu_name()


def cpu_name() -> str:
    """The CPU's model name, its vector instructions, whether bf16 is native, and the threads."""
    model = "CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        model = names[0] if names else model
    bf16 = "native bf16" if cpu_has_fast_bf16() else "no native bf16"
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{model} ({capability}, {bf16}), {torch.get_num_threads()} threads"


def gpu_memory() -> tuple[int, int] | None:
    """(free, total) bytes of this process's GPU (a simulated one's, less what it holds), or None
    without a GPU."""
    runtime = simulated_runtime()
    if runtime is not None and not gpu_available():
        held = int(simulated_gpu.gpu_bytes()) if simulated_gpu is not None else 0
        return runtime.gpu_free - held, runtime.gpu_total
    if not gpu_available():
        return None
    free, total = torch.cuda.mem_get_info(gpu_index())
    return int(free), int(total)


def free_memory() -> int | None:
    """Bytes a run can still use: the GPU's free memory, else the RAM Linux reports available
    (``MemAvailable``), else None."""
    memory = gpu_memory()
    if memory is not None:
        return memory[0]
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    return None


# ---------------------------------------------------------------- the decisions
def device() -> Decision:
    """The device models run on: the process's GPU, else the CPU."""
    if gpu_available():
        index = gpu_index()
        return Decision(torch.device("cuda", index), f"GPU: {torch.cuda.get_device_name(index)}")
    return Decision(
        torch.device("cpu"), f"no usable GPU: the CPU ({torch.get_num_threads()} threads)"
    )


def device_map() -> dict[str, int] | None:
    """``from_pretrained(device_map=...)``: the whole model on this process's GPU, or None on the
    CPU.

    Under ``accelerate launch`` each process owns the GPU named by ``LOCAL_RANK``; reading it first
    keeps a second process from opening a CUDA context on GPU 0.
    """
    if not gpu_available():
        return None
    return {"": gpu_index()}


def compute_dtype() -> Decision:
    """Precision of the matrix products in the 4-bit layers (``bnb_4bit_compute_dtype``) and of a
    16-bit load."""
    runtime = simulated_runtime()
    if not gpu_available() and runtime is None:
        return Decision(
            torch.float32,
            "CPU: 4-bit layers de-quantize to fp32, because bitsandbytes trains "
            "much more slowly with bf16 compute on a CPU",
        )
    if runtime is not None and not gpu_available():
        name, (major, minor) = f"{runtime.name} (simulated)", (7, 5)
    else:
        name = torch.cuda.get_device_name(gpu_index())
        major, minor = torch.cuda.get_device_capability(gpu_index())
    if major >= 8:
        return Decision(
            torch.bfloat16,
            f"{name} (compute capability {major}.{minor}): bf16, native on Ampere "
            "and newer; fp32's range, so no loss scaling",
        )
    return Decision(
        torch.float16,
        f"{name} (compute capability {major}.{minor}): fp16, because bf16 is only "
        "emulated before Ampere (T4, P100, V100); the Trainer scales the loss",
    )


def mixed_precision() -> Decision:
    """The Trainer's ``bf16``/``fp16`` flags (autocast around the forward pass)."""
    if simulated_runtime() is not None and not gpu_available():
        return Decision(
            {"bf16": False, "fp16": False},
            "simulated T4: a T4 trains in fp16 autocast, which the Trainer allows on a GPU only; "
            "the simulation counts its 16-bit activations instead",
        )
    if not gpu_available():
        if cpu_has_fast_bf16():
            return Decision(
                {"bf16": True, "fp16": False},
                "CPU with native bf16: matrix products in bf16 autocast, weights and optimizer "
                "fp32",
            )
        return Decision(
            {"bf16": False, "fp16": False}, "CPU without native bf16: everything in fp32"
        )
    if gpu_has_fast_bf16():
        return Decision({"bf16": True, "fp16": False}, "bf16 autocast: native on this GPU")
    return Decision(
        {"bf16": False, "fp16": True},
        "fp16 autocast with loss scaling: bf16 is emulated on this GPU",
    )


def serving_dtype() -> Decision:
    """Precision of a merged model when it predicts."""
    if on_gpu():
        dtype = compute_dtype().value
        return Decision(dtype, f"GPU: {str(dtype).removeprefix('torch.')}, the compute precision")
    if cpu_has_fast_bf16():
        return Decision(
            torch.bfloat16,
            "CPU with native bf16: bf16 predicts about twice as fast as fp32 "
            "(compare with `python -m helpers.predict --dtype float32`)",
        )
    return Decision(
        torch.float32, "CPU without native bf16: fp32 (bf16 would be emulated, and slower)"
    )


def merge_dtype() -> Decision:
    """Precision of the base that the adapter is merged into (and of the merged model saved)."""
    if on_gpu():
        dtype = compute_dtype().value
        return Decision(
            dtype, f"GPU: {str(dtype).removeprefix('torch.')}, a 16-bit model as it is served"
        )
    return Decision(
        torch.float32, "CPU: fp32, so the merge check compares the merged model exactly"
    )


def attention_implementation(choice: str = "auto", gpu: bool | None = None) -> Decision:
    """The attention kernel: ``choice`` itself, or for "auto" "sdpa" on a GPU and "eager" on the
    CPU (``gpu``: whether this machine is a GPU run, unless given)."""
    if choice != "auto":
        return Decision(choice, f"{choice}: set in the config")
    if on_gpu() if gpu is None else gpu:
        return Decision("sdpa", "GPU: PyTorch's SDPA runs the fused flash/memory-efficient kernels")
    return Decision(
        "eager", "CPU: eager attention trains faster than SDPA on short rows and predicts as fast"
    )


# ---------------------------------------------------------------- peak memory
def reset_peak_memory() -> None:
    """Start a new peak: torch's counter on a GPU, the simulated GPU's, the kernel's peak RSS
    (VmHWM) on Linux CPUs."""
    if simulated_gpu is not None:
        simulated_gpu.peak = 0.0
        return
    if gpu_available():
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # "5" resets the peak resident set size


def peak_memory_mb() -> float:
    """Peak memory since the start or ``reset_peak_memory()``, in MiB: GPU memory allocated by torch
    on a GPU (what a simulated GPU would have held), the process's peak resident set size on the
    CPU."""
    if simulated_gpu is not None:
        return simulated_gpu.peak / 2**20
    if gpu_available():
        return torch.cuda.max_memory_allocated() / 2**20
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def peak_memory_kind() -> Decision:
    """What ``peak_memory_mb`` measures here."""
    if simulated_gpu is not None:
        return Decision(
            "simulated GPU", "what the simulated GPU would hold at the Llama 3 8B shape (estimated)"
        )
    if gpu_available():
        return Decision("GPU", "GPU memory allocated by PyTorch (torch.cuda.max_memory_allocated)")
    return Decision(
        "RSS", "the process's peak resident set size (all of its RAM, libraries included)"
    )


def decisions(attention_choice: str = "auto") -> dict[str, Decision]:
    """Every decision above, as notebook 00 prints them."""
    return {
        "device": device(),
        "compute dtype": compute_dtype(),
        "mixed precision": mixed_precision(),
        "serving dtype": serving_dtype(),
        "merge dtype": merge_dtype(),
        "attention": attention_implementation(attention_choice),
        "peak memory": peak_memory_kind(),
    }
