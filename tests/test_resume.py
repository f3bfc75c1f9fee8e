"""Work is never lost: a killed training run resumes from its last checkpoint to the same result."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
# 64 training rows in batches of 8: 8 steps, a checkpoint every 3
TINY = """profile: smollm2-cpu
train_per_class: 16
val_per_class: 4
test_per_class: 10
max_length: 48
save_steps: 3
logging_steps: 1
eval_batch_size: 16
"""


def _train(*args, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "helpers.train", *map(str, args)],
        cwd=REPO,
        env=env or os.environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.yaml"
    path.write_text(TINY)
    return path


@pytest.fixture(scope="module")
def uninterrupted(tiny_yaml, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    process = _train("--config", tiny_yaml, "--output-dir", out)
    _, stderr = process.communicate(timeout=900)
    assert process.returncode == 0, stderr[-3000:]
    return out


def test_killed_run_resumes_to_the_same_metrics(tiny_yaml, uninterrupted, tmp_path, run_command):
    out = tmp_path / "run"
    process = _train("--config", tiny_yaml, "--output-dir", out)
    first = out / "checkpoints" / "checkpoint-3" / "trainer_state.json"
    deadline = time.monotonic() + 600
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.exists(), process.communicate()[1][-3000:]
    os.killpg(process.pid, signal.SIGKILL)  # a Colab disconnect: no cleanup, no handler runs
    process.wait(timeout=60)
    assert not (out / "metrics.json").exists() and not (out / "merged").exists()

    # the interrupted folder is neither overwritten nor resumed without being asked
    again = run_command("helpers.train", "--config", tiny_yaml, "--output-dir", out)
    assert (
        again.returncode == 2 and "interrupted run" in again.stderr and "--resume" in again.stderr
    )

    resumed = _train("--output-dir", out, "--resume")  # the saved config.yaml is used
    stdout, stderr = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, stderr[-3000:]
    assert "resuming from" in stdout

    done = json.loads((out / "metrics.json").read_text())
    reference = json.loads((uninterrupted / "metrics.json").read_text())
    assert done["resumed_from"].startswith("checkpoint-") and reference["resumed_from"] is None
    for key in ("baseline", "final", "merged", "train_loss"):
        assert done[key] == reference[key], key
    # same logits on every test row, not only the same accuracy
    logits = [
        c for c in pd.read_csv(out / "test_predictions.csv").columns if c.startswith("logit_")
    ]
    pd.testing.assert_frame_equal(
        pd.read_csv(out / "test_predictions.csv")[logits],
        pd.read_csv(uninterrupted / "test_predictions.csv")[logits],
        atol=1e-5,
        rtol=0,
    )


def test_resume_and_overwrite_answer_clearly(tiny_yaml, tmp_path, run_command):
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "metrics.json").write_text("{}")  # a finished run
    finished = run_command("helpers.train", "--output-dir", tmp_path / "done", "--resume")
    assert finished.returncode == 2 and "nothing to resume" in finished.stderr
    empty = run_command(
        "helpers.train", "--config", tiny_yaml, "--output-dir", tmp_path / "new", "--resume"
    )
    assert empty.returncode == 2 and "no complete checkpoint" in empty.stderr
    assert not (tmp_path / "new").exists()
    changed = tmp_path / "changed.yaml"
    changed.write_text(TINY.replace("max_length: 48", "max_length: 64"))
    (tmp_path / "partial" / "checkpoints").mkdir(parents=True)
    (tmp_path / "partial" / "config.yaml").write_text(TINY)
    differ = run_command(
        "helpers.train", "--config", changed, "--output-dir", tmp_path / "partial", "--resume"
    )
    assert differ.returncode == 2 and "['max_length']" in differ.stderr
    both = run_command(
        "helpers.train", "--output-dir", tmp_path / "done", "--resume", "--overwrite"
    )
    assert both.returncode == 2 and "contradict" in both.stderr
