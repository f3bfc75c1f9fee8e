"""Small measurements of the machine itself, used by ``benchmarks/cpu_speed_choices.py`` and by the
predict time test (to compute the arithmetic floor of a prediction run on this machine)."""

from __future__ import annotations

import time

import torch


def matrix_product_gflops(dtype: torch.dtype, repeat: int = 20) -> float:
    """GFLOP/s of one matrix product of SmolLM2's MLP shape (576 -> 1536) on 1,760 rows, a batch of
    32 rows of about 55 tokens: the ceiling for the model's matrix products on this machine."""
    a, b = torch.randn(1760, 576, dtype=dtype), torch.randn(1536, 576, dtype=dtype)
    torch.nn.functional.linear(a, b)  # untimed: kernel setup
    start = time.perf_counter()
    for _ in range(repeat):
        torch.nn.functional.linear(a, b)
    return repeat * 2 * 1760 * 576 * 1536 / (time.perf_counter() - start) / 1e9
