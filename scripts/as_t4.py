"""Run a course command on a big NVIDIA GPU as it would run on a free Colab T4.

    python scripts/as_t4.py -m helpers.train --profile smollm2-cpu --output-dir runs/t4
    python scripts/as_t4.py scripts/gpu_smoke.py --model-dir /tmp/llama3-shape

Two changes, made before the command starts:

- the GPU reports compute capability 7.5, a T4's, so ``helpers.hardware`` decides what it decides
  on a T4: fp16 weights and compute, fp16 autocast with loss scaling, an fp16 merge;
- this process may allocate at most ``T4_BYTES`` (``torch.cuda.set_per_process_memory_fraction``),
  so a step that needs more than a T4 has fails here with CUDA out of memory, as it would there.

Speed is the big GPU's, not a T4's: use it for "does it fit" and "is fp16 right", not for times.
"""

from __future__ import annotations

import runpy
import sys

import torch

# The memory the course designs the llama3-8b path for: a T4's 16 GB less ECC and the CUDA context.
T4_BYTES = 15 * 10**9


def act_as_t4(memory_bytes: int = T4_BYTES) -> None:
    """Make this process's GPU decide and fit like a T4 (see the module docstring)."""
    if not torch.cuda.is_available():
        raise SystemExit("as_t4 needs an NVIDIA GPU: there is none here.")
    torch.cuda.get_device_capability = lambda device=None: (7, 5)
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, memory_bytes / total))
    print(f"as a T4: compute capability 7.5, at most {memory_bytes / 2**30:.2f} GiB allocated")


def main() -> None:
    args = sys.argv[1:]
    if not args:
        raise SystemExit(__doc__)
    act_as_t4()
    if args[0] == "-m":
        sys.argv = [args[1], *args[2:]]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = args
        runpy.run_path(args[0], run_name="__main__")


if __name__ == "__main__":
    main()
