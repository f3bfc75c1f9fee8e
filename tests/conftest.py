"""Shared fixtures: the real SmolLM2 (converted once) and one training run of the train command per
test session, shared by every test that needs a trained model."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from helpers.config import load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def cpu_config():
    """The offline profile, whatever the environment says."""
    return load_config("smollm2-cpu")


# The default profile with a quarter of its training rows and a tenth of its test rows: the
# command's every step, in a few minutes. The default split's accuracy is asserted where it is
# taught (notebooks 06-07).
SMALL_SPLIT = "train_per_class: 50\nval_per_class: 5\ntest_per_class: 10\n"


@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
    """`python -m helpers.train` on the offline profile as the README runs it, with SMALL_SPLIT
    (one run per session)."""
    out = tmp_path_factory.mktemp("runs") / "smollm2-cpu"
    (out.parent / "small.yaml").write_text(SMALL_SPLIT)
    env = {**os.environ, "COURSE_PROFILE": "smollm2-cpu"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "helpers.train",
            "--config",
            str(out.parent / "small.yaml"),
            "--output-dir",
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return {
        "dir": out,
        "metrics": json.loads((out / "metrics.json").read_text()),
        "test": pd.read_csv(out / "test.csv"),
        "stdout": result.stdout,
    }


@pytest.fixture
def run_command(capsys, monkeypatch):
    """A command's ``main()`` in this process, as ``python -m MODULE ARGS`` runs it on the offline
    profile, without a new interpreter's imports. Returns a CompletedProcess (exit code, stdout,
    stderr); an exception escaping ``main()`` fails the test as a traceback would."""

    def run(module, *args):
        monkeypatch.setenv("COURSE_PROFILE", "smollm2-cpu")
        main = importlib.import_module(module).main
        capsys.readouterr()
        code = main([str(arg) for arg in args])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess([module, *args], code, out, err)

    return run
