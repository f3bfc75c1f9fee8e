"""The benchmark runs both recipes in one process and reports them side by side (a tiny sample
here)."""

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.bench import COMMON_RECIPE, common_config, ratios, token_counts
from helpers.config import load_config

REPO = Path(__file__).resolve().parents[1]


def test_common_recipe_is_the_tutorial_one():
    common = common_config(load_config("smollm2-cpu"))
    assert (common.lora_r, common.lora_alpha, common.max_length, common.learning_rate) == (
        16,
        8,
        512,
        1e-4,
    )
    assert (
        common.lora_target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
        and common.gradient_checkpointing
    )
    assert set(COMMON_RECIPE) <= set(common.to_dict())


def test_ratios_are_course_over_common():
    common = {
        "train_samples_per_second": 2.0,
        "train_tokens_per_second": 100.0,
        "inference_samples_per_second": 5.0,
        "inference_tokens_per_second": 300.0,
        "accuracy": 0.5,
        "macro_f1": 0.4,
        "train_peak_memory_mb": 1000.0,
    }
    course = {
        **common,
        "train_samples_per_second": 5.0,
        "inference_samples_per_second": 20.0,
        "inference_tokens_per_second": 600.0,
        "accuracy": 0.8,
    }
    assert ratios(common, course) == {
        "train_throughput": 2.5,
        "train_tokens_per_second": 1.0,
        "inference_throughput": 4.0,
        "inference_tokens_per_second": 2.0,
        "accuracy": 1.6,
        "macro_f1": 1.0,
        "train_peak_memory": 1.0,
    }


def test_token_counts_pad_each_batch_to_its_longest_row():
    lengths = [1, 5, 1, 5, 3]
    assert token_counts(lengths, 2, sort=False) == (15, 5 * 2 + 5 * 2 + 3)
    assert token_counts(lengths, 2, sort=True) == (15, 1 * 2 + 5 * 2 + 5)  # [1, 1], [3, 5], [5]
    assert token_counts(lengths, 8, sort=True) == (15, 5 * 5)


# what bench.json held when the benchmark was in the teaching package: `make bench` still writes it
BENCH_KEYS = {
    "profile",
    "model",
    "hardware",
    "mixed_precision",
    "date",
    "train_rows",
    "test_rows",
    "recipes",
    "ratios",
}
RECIPE_KEYS = {
    "settings",
    "train_seconds",
    "train_samples_per_second",
    "train_tokens_per_second",
    "padding_share",
    "train_peak_memory_mb",
    "trainable_parameters",
    "inference_samples_per_second",
    "inference_tokens_per_second",
    "inference_padding_share",
    "inference_peak_memory_mb",
    "accuracy",
    "macro_f1",
}


def test_make_bench_runs_the_benchmark_outside_the_package():
    assert "$(PY) -m benchmarks.bench $(ARGS)" in (REPO / "Makefile").read_text()
    assert not (REPO / "helpers" / "bench.py").exists()


def test_bench_command_writes_json_and_table(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.bench",
            "--profile",
            "smollm2-cpu",
            "--output-dir",
            str(tmp_path),
            "--train-per-class",
            "4",
            "--test-per-class",
            "4",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert set(bench) == BENCH_KEYS
    assert set(bench["recipes"]["common"]) == set(bench["recipes"]["course"]) == RECIPE_KEYS
    common, course = bench["recipes"]["common"], bench["recipes"]["course"]
    assert bench["train_rows"] == 16 and bench["test_rows"] == 16
    assert set(bench["ratios"]) >= {"train_throughput", "inference_throughput", "accuracy"}
    assert bench["ratios"]["inference_throughput"] == round(
        course["inference_samples_per_second"] / common["inference_samples_per_second"], 3
    )
    # length-grouped batches pad less than random ones (same rows, same batch size)
    assert course["padding_share"] <= common["padding_share"]
    assert 0 <= course["inference_padding_share"] <= common["inference_padding_share"] < 1
    # the common recipe reads at most 512 tokens a row, the course at most max_length: never more
    # tokens (both figures are rounded, hence the 0.5% margin)
    assert course["inference_tokens_per_second"] / course[
        "inference_samples_per_second"
    ] <= 1.005 * (common["inference_tokens_per_second"] / common["inference_samples_per_second"])
    assert (
        course["settings"]["attn_implementation"] == "eager"
        and common["settings"]["attn_implementation"] == "sdpa"
    )
    table = (tmp_path / "bench.md").read_text()
    assert (
        "| training samples/s |" in table and f"{bench['ratios']['train_throughput']:.2f}x" in table
    )
