"""Shared fixtures: the real SmolLM2 (converted once) and one full default training run per test session."""

from __future__ import annotations

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


@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
    """`python -m helpers.train` on the offline default, exactly as the README runs it (one run per session)."""
    out = tmp_path_factory.mktemp("runs") / "smollm2-cpu"
    env = {**os.environ, "COURSE_PROFILE": "smollm2-cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "helpers.train", "--output-dir", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1500,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return {
        "dir": out,
        "metrics": json.loads((out / "metrics.json").read_text()),
        "test": pd.read_csv(out / "test.csv"),
        "stdout": result.stdout,
    }
