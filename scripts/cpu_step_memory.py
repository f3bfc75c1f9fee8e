"""Measure the peak memory of one QLoRA training step on the CPU and set it beside the estimate.

    python scripts/cpu_step_memory.py [--batch-size 8] [--max-length 128] [--output FILE.json]

Loads the ``smollm2-cpu`` model as training does (4-bit, prepared, LoRA), takes one step to create
the optimizer's state, then measures a second step: forward, backward and optimizer step, under the
machine's mixed precision (bf16 autocast on CPUs with native bf16) or in fp32. The peak is the
largest total of tensor bytes alive at once, as PyTorch's CPU allocator reports it to the profiler:
the CPU counterpart of ``torch.cuda.max_memory_allocated``, which the GPU figures use. Measured =
the loaded model (``get_memory_footprint``) + the optimizer's state + that peak. The process's
resident set's growth over the first step (not profiled) is printed beside it (``rss_growth``:
it also counts what the C allocator keeps after a free, and the kernels' own buffers).

``helpers.memory.estimate_memory`` is compared without its evaluation term: a training step is
what is measured here. ``tests/test_gpu_path.py`` asserts the 15% agreement on every case.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch.autograd import profiler

from helpers.config import load_config
from helpers.hardware import cpu_has_fast_bf16, hardware_name, peak_memory_mb, reset_peak_memory
from helpers.instruct import IGNORE_INDEX, ResponseLossTrainer
from helpers.memory import answer_tokens, estimate_memory, sequence_tokens
from helpers.modeling import add_lora, load_for_task

MiB = 2**20


def allocated_peak(step: Any) -> int:
    """Run ``step()`` and return the largest number of bytes it held allocated at once (tensors
    alive before it do not count)."""
    with profiler.profile(profile_memory=True, use_cpu=True) as prof:
        step()
    events = [e for e in prof.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak


def measure(
    task: str = "classify",
    checkpointing: bool = False,
    autocast: bool = False,
    batch_size: int = 8,
    max_length: int = 128,
) -> dict[str, Any]:
    """One training step of the ``smollm2-cpu`` model on the longest batch the settings allow."""
    config = load_config(
        "smollm2-cpu",
        task=task,
        batch_size=batch_size,
        max_length=max_length,
        gradient_checkpointing=checkpointing,
    )
    model, _ = load_for_task(config)
    model = add_lora(model, config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    # every row as long as the estimate's longest batch
    generator = torch.Generator().manual_seed(config.seed)
    ids = torch.randint(
        100, model.config.vocab_size, (batch_size, sequence_tokens(config)), generator=generator
    )
    mask = torch.ones_like(ids)

    def loss() -> torch.Tensor:
        if task == "instruct":  # the loss on the answer tokens only, as notebook 08 trains
            labels = torch.full_like(ids, IGNORE_INDEX)
            labels[:, -answer_tokens(config) :] = ids[:, -answer_tokens(config) :]
            inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
            return ResponseLossTrainer.compute_loss(None, model, inputs)  # type: ignore[arg-type]
        logits = model(input_ids=ids, attention_mask=mask).logits
        return torch.nn.functional.cross_entropy(logits.float(), torch.arange(batch_size) % 4)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            value = loss()
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    reset_peak_memory()  # on the CPU: the peak resident set size starts again from the current one
    before = peak_memory_mb()
    step()  # creates the optimizer's state
    rss_growth = peak_memory_mb() - before  # of this first step, before any profiling
    state = sum(
        t.numel() * t.element_size()
        for s in optimizer.state.values()
        for t in s.values()
        if torch.is_tensor(t) and t.dim() > 0
    )
    peak = allocated_peak(step)
    measured = model.get_memory_footprint() + state + peak
    estimate = estimate_memory(config, model.config, bits=4, on_gpu=False)
    estimated = estimate.training  # no overhead on the CPU
    return {
        "task": task,
        "gradient_checkpointing": checkpointing,
        "precision": "bf16 autocast" if autocast else "fp32",
        "batch": f"{batch_size} x {sequence_tokens(config)}",
        "measured_mib": round(measured / MiB, 1),
        "step_peak_mib": round(peak / MiB, 1),
        "rss_growth_mib": round(rss_growth, 1),
        "estimate_mib": round(estimated / MiB, 1),
        "estimate_activations_mib": round(estimate.activations / MiB, 1),
        "ratio": round(estimated / measured, 3),
        "hardware": hardware_name(),
    }


def cases() -> list[dict[str, Any]]:
    """fp32 and, where the CPU has native bf16, the bf16 autocast training runs under; with and
    without gradient checkpointing; the classifier and instruction tuning."""
    autocast = cpu_has_fast_bf16()
    chosen = [
        {"task": "classify", "checkpointing": False, "autocast": False},
        {"task": "classify", "checkpointing": True, "autocast": autocast},
        {"task": "instruct", "checkpointing": False, "autocast": autocast},
    ]
    if autocast:
        chosen.append({"task": "classify", "checkpointing": False, "autocast": True})
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--output", type=Path)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # one case, as JSON, in this process
    args = parser.parse_args()
    size = {"batch_size": args.batch_size, "max_length": args.max_length}
    if args.case:
        print(json.dumps(measure(**json.loads(args.case), **size)))
        return
    # each case in a fresh process, so that its resident set starts from the loaded model alone
    rows = []
    for case in cases():
        command = [sys.executable, __file__, "--case", json.dumps(case)]
        command += ["--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    columns = [
        "task",
        "gradient_checkpointing",
        "precision",
        "batch",
        "measured_mib",
        "estimate_mib",
        "ratio",
        "step_peak_mib",
        "rss_growth_mib",
    ]
    print("| " + " | ".join(columns) + " |")
    print("|" + " --- |" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")
    print("machine:", rows[0]["hardware"])
    if args.output:
        args.output.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
