"""`make lab` opens the notebooks with the course's kernel: the kernel it registers is the one every
notebook names, and that kernel's Python imports ``helpers``. (Lab itself is not started here.)"""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parents[1]
# the chapters and their solutions
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")) + sorted(
    (REPO / "notebooks" / "solutions").glob("*.ipynb")
)


def makefile_variables() -> dict[str, str]:
    text = (REPO / "Makefile").read_text()
    return dict(re.findall(r"^([A-Z_]+)\s*[:?]?=\s*(.*?)\s*$", text, flags=re.MULTILINE))


def lab_kernel_install() -> list[str]:
    """The lab target's `ipykernel install` command, its Make variables expanded, as arguments
    after ``python``."""
    text = (REPO / "Makefile").read_text()
    recipe = re.search(r"^lab:.*\n((?:\t.*\n)+)", text, flags=re.MULTILINE)
    assert recipe, "the Makefile has no lab target"
    line = next(cmd for cmd in recipe.group(1).splitlines() if "ipykernel install" in cmd)
    variables = makefile_variables()
    line = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), m.group(0)), line)
    args = shlex.split(line.strip())
    return args[args.index("-m") :]


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_the_lab_target_opens_lab_in_notebooks_with_a_kernel_in_the_venv_only():
    args = lab_kernel_install()
    assert "--sys-prefix" in args and "--user" not in args  # never the learner's home directory
    text = (REPO / "Makefile").read_text()
    assert re.search(r"^\.PHONY:.*\blab\b", text, flags=re.MULTILINE)
    assert re.search(r"jupyter lab --notebook-dir notebooks", text)
    assert re.search(r"^lab: setup\b", text, flags=re.MULTILINE)  # ready for a fresh clone
    pins = (REPO / "requirements-lab.txt").read_text()
    assert re.search(r"^jupyterlab==\d+\.\d+\.\d+$", pins, flags=re.MULTILINE)


def test_every_notebook_names_the_kernel_that_make_lab_registers():
    args = lab_kernel_install()
    name, display = option(args, "--name"), option(args, "--display-name")
    for path in NOTEBOOKS:
        spec = nbformat.read(path, as_version=4).metadata.get("kernelspec", {})
        assert spec == {"name": name, "display_name": display, "language": "python"}, path.name


def test_the_registered_kernel_imports_helpers(tmp_path):
    args = lab_kernel_install()
    args[args.index("--sys-prefix")] = "--prefix"
    args.insert(args.index("--prefix") + 1, str(tmp_path))
    subprocess.run([sys.executable, *args], check=True, capture_output=True, timeout=120)
    name = option(args, "--name")
    spec = json.loads((tmp_path / "share/jupyter/kernels" / name / "kernel.json").read_text())
    assert spec["display_name"] == option(args, "--display-name")
    python = spec["argv"][0]
    result = subprocess.run(
        [python, "-c", "import helpers; print(helpers.__file__)"],
        cwd=tmp_path,  # not the repository: helpers must come from the installed course
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).parent == REPO / "helpers"
