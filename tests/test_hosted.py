"""Every notebook starts on a hosted runtime (Colab, Kaggle) by itself: its setup cell fetches and
installs the course when ``helpers`` is missing; saved results go where ``COURSE_OUTPUTS`` says."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import nbformat
import pytest

from helpers.io import cache_dir

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
# the exercises' solutions, one per chapter (notebooks/solutions/NN_<chapter>_solutions.ipynb)
SOLUTIONS = sorted((REPO / "notebooks" / "solutions").glob("*.ipynb"))

EXECUTE = """
import sys, nbformat
from nbclient import NotebookClient
for path in sys.argv[1:]:
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=900, kernel_name="python3").execute()
    nbformat.write(notebook, path)
"""


def test_every_notebook_opens_with_the_same_setup_cell_before_helpers():
    cells = []
    for path in NOTEBOOKS + SOLUTIONS:
        code = [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
        setup = next(i for i, source in enumerate(code) if "hosted_setup.py" in source)
        first_helpers = next(i for i, source in enumerate(code) if "helpers" in source)
        assert setup <= first_helpers, path.name  # the setup cell mentions helpers itself
        cells.append(code[setup])
    assert len(set(cells)) == 1, "the setup cells differ"


def test_every_chapter_with_exercises_has_its_solutions_notebook():
    """Solutions sit in notebooks/solutions/ under the chapter's name, name their chapter, and keep
    what they save apart from the chapters' outputs (in <outputs>/<profile>/solutions/)."""
    chapters = {
        path.stem: path
        for path in NOTEBOOKS
        if any("## Exercises" in c.source for c in nbformat.read(path, as_version=4).cells)
    }
    assert chapters, "no chapter has exercises"
    expected = sorted(f"{stem}_solutions.ipynb" for stem in chapters)
    assert sorted(p.name for p in SOLUTIONS) == expected
    for path in SOLUTIONS:
        cells = nbformat.read(path, as_version=4).cells
        chapter = path.name.removesuffix("_solutions.ipynb") + ".ipynb"
        assert cells[0].cell_type == "markdown" and cells[0].source.startswith("# "), path.name
        assert f"](../{chapter})" in cells[0].source, path.name
        assert "**takes:**" in cells[0].source, path.name
        code = "\n".join(c.source for c in cells if c.cell_type == "code")
        assert 'output_dir / "solutions"' in code, path.name
        assert "assert " in code, path.name


@pytest.fixture
def hosted_python(tmp_path):
    """A Python that lacks ``helpers`` but has the course's packages, as a hosted runtime has its
    own: a bare virtual environment that sees this one's site-packages through PYTHONPATH, where
    .pth files (the editable install of ``helpers``) are not read."""
    venv = tmp_path / "hosted-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    env = {
        **os.environ,
        "PYTHONPATH": sysconfig.get_paths()["purelib"],
        "COURSE_REPO": str(REPO),
        "COURSE_OUTPUTS": str(tmp_path / "saved"),
        "COURSE_CACHE": str(cache_dir()),  # the converted model, not converted again
        "COURSE_PROFILE": "smollm2-cpu",
    }
    python = str(venv / "bin" / "python")
    lacks = subprocess.run([python, "-c", "import helpers"], cwd=tmp_path, env=env)
    assert lacks.returncode != 0, "helpers is importable: not a hosted runtime"
    return python, env


def test_notebooks_01_and_05_run_on_a_hosted_runtime_by_themselves(tmp_path, hosted_python):
    python, env = hosted_python
    work = tmp_path / "content"
    work.mkdir()
    for name in ("01_data_and_balancing.ipynb", "05_baseline.ipynb"):
        shutil.copy(REPO / "notebooks" / name, work / name)
    result = subprocess.run(
        [python, "-c", EXECUTE, "01_data_and_balancing.ipynb", "05_baseline.ipynb"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    course = work / "llama3-course"
    assert (course / "pyproject.toml").is_file() and (course / ".hosted-installed").is_file()
    saved = tmp_path / "saved" / "smollm2-cpu" / "baseline_metrics.json"
    baseline = json.loads(saved.read_text())
    assert 0 <= baseline["accuracy"] < 0.5  # the untrained head, saved where COURSE_OUTPUTS says
    executed = nbformat.read(work / "05_baseline.ipynb", as_version=4)
    assert not [o for c in executed.cells for o in c.get("outputs", []) if o.output_type == "error"]

    # rerunning the setup is a no-op
    again = subprocess.run(
        [python, str(course / "scripts" / "hosted_setup.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0 and "installed already" in again.stdout


def test_outputs_folder_by_environment(monkeypatch, tmp_path):
    from helpers import notebook

    monkeypatch.setenv("COURSE_OUTPUTS", str(tmp_path / "mine"))
    assert notebook.outputs_root() == tmp_path / "mine"
    monkeypatch.delenv("COURSE_OUTPUTS")
    monkeypatch.setattr(notebook, "COLAB_DRIVE", tmp_path / "drive")
    monkeypatch.setattr(notebook, "KAGGLE_WORKING", tmp_path / "kaggle")
    assert notebook.outputs_root() == REPO / "notebooks" / "outputs"
    (tmp_path / "kaggle").mkdir()
    assert notebook.outputs_root() == tmp_path / "kaggle" / "outputs"
    (tmp_path / "drive").mkdir()  # Drive mounted on Colab: results outlive a disconnect
    assert notebook.outputs_root() == tmp_path / "drive" / "llama3-course" / "outputs"
