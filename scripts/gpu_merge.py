"""Measure the course's merge on a GPU: time, peak GPU memory and peak RAM of each step.

    python scripts/gpu_merge.py ADAPTER_DIR MERGED_DIR [--check-rows 32] [--output FILE.json]

Runs ``helpers.merging.merge_and_save`` on an adapter folder (for example the one
``scripts/gpu_smoke.py --save-adapter`` writes at the Llama 3 8B shape), then loads the merged
folder with ``helpers.merging.load_for_inference`` as ``helpers.predict`` does. Each step's peak is
the process's peak resident set size (VmHWM, reset between steps) and torch's peak GPU allocation.
A step that fails (CUDA out of memory under ``scripts/as_t4.py``) is recorded with its error. On a
machine without a GPU the same steps run on the CPU (a test does this with the tiny model).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

from helpers.data import load_ag_news
from helpers.hardware import hardware_name, merge_dtype
from helpers.merging import load_for_inference, merge_and_save


def _rss_peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _gpu_peak_mb() -> float | None:
    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def _reset() -> None:
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _step(name: str, figures: dict, work) -> object:
    _reset()
    start = time.perf_counter()
    try:
        result = work()
        error = None
    except Exception as exc:  # the measurement records the failure, then stops
        result, error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    figures[name] = {
        "seconds": round(time.perf_counter() - start, 1),
        "peak_gpu_mb": _gpu_peak_mb(),
        "peak_rss_mb": round(_rss_peak_mb(), 1),
        "error": error,
    }
    print(name, json.dumps(figures[name]), flush=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter")
    parser.add_argument("merged")
    parser.add_argument("--check-rows", type=int, default=32)
    parser.add_argument("--output", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    texts = load_ag_news()["text"].tolist()[: args.check_rows]
    figures: dict = {
        "hardware": hardware_name(),
        "merge_dtype": str(merge_dtype().value).removeprefix("torch."),
        "date": time.strftime("%Y-%m-%d"),
    }
    result = _step(
        "merge_and_save", figures, lambda: merge_and_save(args.adapter, args.merged, texts)
    )
    if result is not None:
        figures["merge_check"] = result[2]
        del result
        files = sorted(Path(args.merged).glob("*.safetensors"))
        figures["merged_files_gb"] = [round(f.stat().st_size / 1e9, 2) for f in files]
        _step("load_for_inference", figures, lambda: load_for_inference(args.merged))
    print(json.dumps(figures, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
