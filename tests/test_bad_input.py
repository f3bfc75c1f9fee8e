"""What a careless learner or a hostile file feeds `helpers.predict`: each case gets exit code 2 and
one line that names the problem and the fix, before any model is loaded, and nothing is lost or left
behind; the inputs that are fine (a byte-order mark, extra columns) are read as meant."""

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from helpers.config import AG_NEWS_LABELS
from helpers.io import atomic_directory, atomic_write_text

AG_ROWS = '3,"Stocks rally","Oil prices fall."\n2,"Cup final","The home side won."\n'


def _text(content: str) -> bytes:
    return content.encode()


# (case, input file bytes or None for no file, what stderr's one line must say)
REFUSED = [
    ("unquoted comma", _text("text\nStocks rally, oil prices fall\n"), "2 fields where the file"),
    ("latin-1 bytes", "text\nCafé opens\n".encode("latin-1"), "is not UTF-8"),
    ("utf-16", "text\nhello\n".encode("utf-16"), "is UTF-16"),
    ("unterminated quote", _text('text\n"Stocks rally\n'), "Check the quotes"),
    ("duplicate text columns", _text("text,text\na,b\n"), "more than once"),
    ("short AG News row", _text(AG_ROWS + '1,"Title only"\n'), "2 fields where the file has 3"),
    ("long AG News row", _text(AG_ROWS + '1,"T","D","extra"\n'), "4 fields where the file has 3"),
    ("NUL bytes", b"text\n\x00\x00\n", "NUL bytes"),
    ("empty file", b"", "is empty"),
    ("header without rows", _text("text\n"), "has a header but no rows"),
    ("no file", None, "does not exist"),
    ("no text column", _text("body\nsomething\n"), "Rename the column"),
    ("label out of range", _text("text,label\na,7\n"), "outside the label set"),
    ("label not a label", _text("text,label\na,Weather\n"), "neither an integer"),
    ("AG News label 0", _text('0,"T","D"\n'), "outside the label set"),
]


@pytest.fixture
def labels_only(tmp_path):
    """A model folder as far as predict reads before loading weights: its labels."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "course_labels.json").write_text(json.dumps({"labels": list(AG_NEWS_LABELS)}))
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize(("case", "content", "says"), REFUSED, ids=[c[0] for c in REFUSED])
def test_bad_input_files_are_refused_in_one_line(
    run_command, labels_only, tmp_path, case, content, says
):
    source = tmp_path / "input.csv"
    if content is not None:
        source.write_bytes(content)
    before = _snapshot(tmp_path)
    out = tmp_path / "out.csv"
    result = run_command(
        "helpers.predict", "--model", labels_only, "--input", source, "--output", out
    )
    assert result.returncode == 2, case
    assert says in _one_line(result.stderr), (case, result.stderr)
    assert _snapshot(tmp_path) == before  # nothing written, nothing changed


def test_output_that_is_the_input_is_refused_and_the_input_kept(run_command, labels_only, tmp_path):
    source = tmp_path / "input.csv"
    source.write_text(AG_ROWS)
    result = run_command(
        "helpers.predict", "--model", labels_only, "--input", source, "--output", source
    )
    assert result.returncode == 2
    assert "is the input file" in _one_line(result.stderr)
    assert source.read_text() == AG_ROWS


@pytest.mark.parametrize(
    ("output", "says"),
    [("folder", "is a folder"), ("/proc/no-such-folder/out.csv", "cannot write")],
)
def test_unusable_output_is_refused_before_any_work(
    run_command, labels_only, tmp_path, output, says
):
    source = tmp_path / "input.csv"
    source.write_text(AG_ROWS)
    target = tmp_path / output if output == "folder" else Path(output)
    if output == "folder":
        target.mkdir()
    result = run_command(
        "helpers.predict", "--model", labels_only, "--input", source, "--output", target
    )
    assert result.returncode == 2
    assert says in _one_line(result.stderr)


def _predict(run_command, default_run, source: Path, out: Path):
    return run_command(
        "helpers.predict", "--model", default_run["dir"] / "merged", "--input", source,
        "--output", out,
    )  # fmt: skip


def test_a_byte_order_mark_is_read_as_utf8(run_command, default_run, tmp_path):
    """Spreadsheets save 'CSV UTF-8' with a byte-order mark: still the AG News layout."""
    source = tmp_path / "bom.csv"
    source.write_bytes("\ufeff".encode() + AG_ROWS.encode())
    result = _predict(run_command, default_run, source, tmp_path / "out.csv")
    assert result.returncode == 0, result.stderr
    written = pd.read_csv(tmp_path / "out.csv")
    assert written["label"].tolist() == ["Business", "Sports"]
    assert "accuracy" in result.stdout


def test_extra_columns_pass_through_and_commas_in_quotes_stay(run_command, default_run, tmp_path):
    source = tmp_path / "extra.csv"
    source.write_text('id,text,source\n7,"Stocks rally, oil prices fall",wire\n9,Cup final,blog\n')
    result = _predict(run_command, default_run, source, tmp_path / "out.csv")
    assert result.returncode == 0, result.stderr
    written = pd.read_csv(tmp_path / "out.csv")
    assert written["id"].tolist() == [7, 9] and written["source"].tolist() == ["wire", "blog"]
    assert written["text"][0] == "Stocks rally, oil prices fall"
    assert set(written["predicted_label"]) <= set(AG_NEWS_LABELS)


def test_labels_that_look_shifted_get_a_warning(run_command, default_run, tmp_path):
    """A header file counting from 1 that never says 4: read 0-based, and the learner is told."""
    source = tmp_path / "shifted.csv"
    rows = [f"Article number {i},{1 + i % 3}" for i in range(8)]
    source.write_text("text,label\n" + "\n".join(rows) + "\n")
    result = _predict(run_command, default_run, source, tmp_path / "out.csv")
    assert result.returncode == 0, result.stderr
    assert "labels never use 0" in result.stderr


def test_ctrl_c_keeps_the_rows_written_so_far(run_command, default_run, tmp_path, monkeypatch):
    import helpers.predict as predict

    calls = []
    real = predict.model_outputs

    def interrupted_on_the_second_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(predict, "CHUNK_ROWS", 2)
    monkeypatch.setattr(predict, "model_outputs", interrupted_on_the_second_chunk)
    source = tmp_path / "five.csv"
    source.write_text("text\n" + "\n".join(f"Headline {i}" for i in range(5)) + "\n")
    out = tmp_path / "out.csv"
    result = _predict(run_command, default_run, source, out)
    assert result.returncode == 130
    assert "interrupted after 2 of 5 rows" in result.stderr.strip().splitlines()[-1]
    assert not out.exists()
    kept = pd.read_csv(tmp_path / "out.partial.csv")
    assert kept["text"].tolist() == ["Headline 0", "Headline 1"]


def test_outputs_get_the_users_permissions_not_private_ones(tmp_path):
    mask = os.umask(0o022)
    try:
        written = atomic_write_text(tmp_path / "metrics.json", "{}")
        with atomic_directory(tmp_path / "adapter") as folder:
            (folder / "x").write_text("x")
    finally:
        os.umask(mask)
    assert written.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o755


# ---------------------------------------------------------------- settings, before any work
SETTINGS = [
    ("learning rate not a number", "learning_rate: fast\n", "must be a number"),
    ("batch of 0", "batch_size: 0\n", "batch_size=0 is out of range"),
    ("no epochs", "epochs: 0\n", "epochs=0.0 is out of range"),
    ("no training rows", "train_per_class: 0\n", "train_per_class=0 is out of range"),
    ("negative training rows", "train_per_class: -4\n", "train_per_class=-4 is out of range"),
    ("negative validation rows", "val_per_class: -6\n", "val_per_class=-6 is out of range"),
    ("fractional batch", "batch_size: 8.5\n", "must be a whole number"),
    ("dropout of 1", "lora_dropout: 1.0\n", "lora_dropout=1.0 is out of range"),
    ("checkpointing as 1", "gradient_checkpointing: 1\n", "is not one of"),
    ("unknown task", "task: translate\n", "task='translate' is not one of"),
    ("unknown data source", "data_source: web\n", "data_source='web' is not one of"),
    ("4-bit as a word", "load_in_4bit: maybe\n", "must be true or false"),
    ("one label", "labels: [News]\n", "two or more distinct names"),
    ("empty LoRA targets", "lora_target_modules: []\n", "'all-linear' or a list"),
    ("misspelt setting", "learning_rat: 0.001\n", "Unknown config setting"),
    ("a list, not settings", "- learning_rate\n- 0.001\n", "must hold a mapping"),
    ("unknown profile", "profile: gpt-9\n", "Unknown profile 'gpt-9'"),
]


@pytest.mark.parametrize(("case", "yaml_text", "says"), SETTINGS, ids=[c[0] for c in SETTINGS])
def test_bad_settings_are_refused_before_any_work(run_command, tmp_path, case, yaml_text, says):
    (tmp_path / "settings.yaml").write_text(yaml_text)
    out = tmp_path / "run"
    result = run_command(
        "helpers.train", "--config", tmp_path / "settings.yaml", "--output-dir", out
    )
    assert result.returncode == 2, case
    assert says in _one_line(result.stderr), (case, result.stderr)
    assert not out.exists() and not list(tmp_path.glob(".run*"))


def test_yaml_reads_1e_3_as_the_number_it_means(tmp_path):
    from helpers.config import load_config

    (tmp_path / "lr.yaml").write_text("learning_rate: 1e-3\nwarmup_ratio: 5e-2\n")
    config = load_config("smollm2-cpu", tmp_path / "lr.yaml")
    assert (config.learning_rate, config.warmup_ratio) == (0.001, 0.05)


def _finished_run(folder: Path) -> dict[str, bytes]:
    folder.mkdir()
    (folder / "metrics.json").write_text('{"final": {"accuracy": 0.87}}')
    (folder / "config.yaml").write_text("profile: smollm2-cpu\n")
    (folder / "adapter").mkdir()
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    return _snapshot(folder)


def test_a_lora_target_typo_fails_before_the_old_run_is_touched(run_command, tmp_path):
    run = tmp_path / "run"
    before = _finished_run(run)
    (tmp_path / "typo.yaml").write_text("lora_target_modules: [q_proj, v_prj]\n")
    result = run_command(
        "helpers.train", "--config", tmp_path / "typo.yaml", "--output-dir", run, "--overwrite"
    )
    assert result.returncode == 2
    # after the model's own loading report: the one line of the course's error
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "['v_prj'], which this model does not have" in last
    assert _snapshot(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "typo.yaml"]  # no lock, no build


def test_overwrite_refuses_a_folder_that_is_not_a_run(run_command, tmp_path):
    mine = tmp_path / "Documents"
    mine.mkdir()
    (mine / "thesis.docx").write_bytes(b"years of work")
    result = run_command("helpers.train", "--output-dir", mine, "--overwrite")
    assert result.returncode == 2
    assert "not a run of this course" in _one_line(result.stderr)
    assert (mine / "thesis.docx").read_bytes() == b"years of work"


def test_a_second_run_into_a_locked_folder_is_refused(run_command, tmp_path):
    run = tmp_path / "run"
    (tmp_path / ".run.lock").write_text("1")  # process 1 is always alive
    result = run_command("helpers.train", "--output-dir", run)
    assert result.returncode == 2
    assert "another run (process 1) is writing" in _one_line(result.stderr)
    assert not run.exists() and (tmp_path / ".run.lock").read_text() == "1"


def _dead_pid() -> int:
    import subprocess

    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_run_folder_cleans_what_killed_runs_left_and_swaps_only_when_complete(tmp_path, capsys):
    from helpers.train import run_folder

    run = tmp_path / "run"
    before = _finished_run(run)
    (tmp_path / ".run.lock").write_text(str(_dead_pid()))  # a killed run's lock
    (tmp_path / ".run.new").mkdir()  # a killed overwrite's half-built run
    (run / ".merged.abc.tmp").mkdir()  # a killed merge's temporary folder
    with pytest.raises(RuntimeError), run_folder(run, replace=True) as build:
        assert build == tmp_path / ".run.new" and not any(build.iterdir())
        (build / "metrics.json").write_text("{}")
        raise RuntimeError("the new run failed")
    said = capsys.readouterr().out
    assert "removed the lock" in said and said.count("left by a run that was stopped") == 2
    assert _snapshot(run) == before  # the old run exactly as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no build, no lock
    with run_folder(run, replace=True) as build:
        (build / "metrics.json").write_text('{"final": {"accuracy": 0.9}}')
    assert json.loads((run / "metrics.json").read_text())["final"]["accuracy"] == 0.9
    assert not (run / "adapter").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# ---------------------------------------------------------------- model folders
def _copy_model(source: Path, target: Path) -> Path:
    """A copy of a model folder; the weights hard-linked (the test replaces, never edits them)."""
    target.mkdir()
    for path in source.iterdir():
        if path.suffix == ".safetensors":
            os.link(path, target / path.name)
        else:
            (target / path.name).write_bytes(path.read_bytes())
    return target


def _labels_file(folder: Path) -> dict:
    return json.loads((folder / "course_labels.json").read_text())


def _truncate_weights(folder: Path) -> None:
    weights = folder / "model.safetensors"
    head = weights.read_bytes()[: 2**20]
    weights.unlink()  # the hard link: the original stays whole
    weights.write_bytes(head)


def _relabel(folder: Path, labels: list[str]) -> None:
    meta = _labels_file(folder)
    meta["labels"] = labels
    meta["id2label"] = {str(i): x for i, x in enumerate(labels)}
    (folder / "course_labels.json").write_text(json.dumps(meta))


MODEL_FOLDERS = [
    ("truncated weights", "merged", _truncate_weights, "cannot load the model"),
    ("empty label file", "merged", lambda f: (f / "course_labels.json").write_text(""), "damaged"),
    (
        "cut-off label file",
        "merged",
        lambda f: (f / "course_labels.json").write_text('{"labels": ["Wor'),
        "damaged",
    ),
    (
        "three labels for a four-class head",
        "merged",
        lambda f: _relabel(f, ["World", "Sports", "Business"]),
        "but the model's config.json",
    ),
    (
        "labels in another order",
        "merged",
        lambda f: _relabel(f, ["Sports", "World", "Business", "Sci/Tech"]),
        "but the model's config.json",
    ),
    (
        "id2label out of step with labels",
        "merged",
        lambda f: (f / "course_labels.json").write_text(
            json.dumps({**_labels_file(f), "id2label": {"0": "Sports"}})
        ),
        "does not list the labels",
    ),
    (
        "an adapter whose base is missing",
        "adapter",
        lambda f: (f / "course_labels.json").write_text(
            json.dumps({**_labels_file(f), "base_model": "someone/missing-model"})
        ),
        "the adapter's base model someone/missing-model cannot be loaded",
    ),
    (
        "neither merged nor adapter",
        "merged",
        lambda f: [(f / n).unlink() for n in ("config.json", "model.safetensors")],
        "neither a merged model",
    ),
]


@pytest.mark.parametrize(
    ("case", "which", "damage", "says"), MODEL_FOLDERS, ids=[c[0] for c in MODEL_FOLDERS]
)
def test_damaged_model_folders_are_named_in_one_line(
    run_command, default_run, tmp_path, case, which, damage, says
):
    folder = _copy_model(default_run["dir"] / which, tmp_path / which)
    damage(folder)
    source = tmp_path / "input.csv"
    source.write_text(AG_ROWS)
    out = tmp_path / "out.csv"
    result = run_command("helpers.predict", "--model", folder, "--input", source, "--output", out)
    assert result.returncode == 2, (case, result.stderr[-2000:])
    assert says in result.stderr.strip().splitlines()[-1], (case, result.stderr[-2000:])
    assert not out.exists() and not list(tmp_path.glob("out.partial*"))


# ---------------------------------------------------------------- the benchmark
@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--train-per-class", "0"], "--train-per-class 0: give at least 1"),
        (["--test-per-class", "-2"], "--test-per-class -2: give at least 1"),
        (["--output-dir", "/proc/no-such-folder/bench"], "cannot be written"),
    ],
)
def test_the_benchmark_checks_its_arguments_before_it_starts(run_command, args, says):
    result = run_command("benchmarks.bench", *args)
    assert result.returncode == 2
    assert says in _one_line(result.stderr)


# ---------------------------------------------------------------- no network, and the notebooks
def test_the_gpu_profile_without_the_hub_says_so_at_once(run_command, tmp_path, monkeypatch):
    import time

    import helpers.data
    import helpers.modeling

    monkeypatch.setattr(helpers.data, "hub_reachable", lambda: False)
    monkeypatch.setattr(helpers.modeling, "hub_reachable", lambda: False)
    start = time.perf_counter()
    result = run_command("helpers.train", "--profile", "llama3-8b", "--output-dir", tmp_path / "r")
    assert time.perf_counter() - start < 30
    assert result.returncode == 2
    assert "no network or no Hub access" in _one_line(result.stderr)
    assert not (tmp_path / "r").exists()
    with pytest.raises(helpers.modeling.ModelError, match="no network or no Hub access"):
        helpers.modeling.check_hub_reachable("someone/not-cached")


def test_notebooks_silence_the_libraries_warnings_not_the_courses():
    import warnings

    from helpers.notebook import quiet_libraries

    with warnings.catch_warnings(record=True) as shown:
        warnings.resetwarnings()
        quiet_libraries()
        for module in ("transformers.trainer", "peft.tuners", "helpers.evaluation", "__main__"):
            warnings.warn_explicit(f"from {module}", UserWarning, "x.py", 1, module=module)
    assert [str(w.message) for w in shown] == ["from helpers.evaluation", "from __main__"]
