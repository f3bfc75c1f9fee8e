"""The stored notebook outputs come from one run: what 08's comparison table reads from 06 and 07
must be what 06 and 07 show."""

import re
from datetime import datetime, timedelta
from pathlib import Path

import nbformat

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def outputs(notebook: str, needle: str) -> str:
    """The stored text output of the one code cell of ``notebook`` whose source holds ``needle``."""
    cells = [
        c
        for c in nbformat.read(NOTEBOOKS / notebook, as_version=4).cells
        if c.cell_type == "code" and needle in c.source
    ]
    assert len(cells) == 1, (notebook, needle)
    text = []
    for out in cells[0].outputs:
        text.append("".join(out.get("text", "")))
        text.append("".join(out.get("data", {}).get("text/plain", "")))
    return "\n".join(text)


def head_row_of_08() -> dict[str, float]:
    table = outputs("08_instruction_tuning.ipynb", "comparison = pd.DataFrame.from_dict(")
    numbers = {}
    # pandas wraps wide tables: each block starts with a header line, then one line per row
    lines = table.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("classification head (06-07)"):
            header = lines[i - 1].replace("\\", "")
            names = re.findall(r"[a-zA-Z][\w/ -]*?(?=\s{2,}|$)", header.strip())
            values = line.removeprefix("classification head (06-07)").replace("\\", "").split()
            numbers.update(zip([n.strip() for n in names], map(float, values), strict=True))
    return numbers


def test_08s_table_reads_what_06_and_07_show():
    head = head_row_of_08()
    trained_06 = outputs("06_training.ipynb", "examples/s")
    seconds_06 = float(re.search(r"\| (\d+) s \|", trained_06).group(1))
    assert abs(head["training s"] - seconds_06) <= 1, (head, trained_06)
    rows_06 = outputs("06_training.ipynb", 'val_data = tokenize(splits["val"]')
    assert f"num_rows: {int(head['training rows'])}" in rows_06
    table_07 = outputs("07_evaluation_and_merging.ipynb", 'comparison = pd.DataFrame({"baseline')
    accuracy_07 = float(re.search(r"^accuracy\s+\S+\s+(\S+)", table_07, re.M).group(1))
    assert abs(head["accuracy"] - accuracy_07) <= 0.0006, (head, table_07)


ALL = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")) + sorted(NOTEBOOKS.glob("solutions/*.ipynb"))


def span(path: Path) -> tuple[datetime, datetime]:
    """When the stored run of ``path`` started its first cell and finished its last (nbclient
    records both in each cell's metadata)."""
    times = [
        c.metadata["execution"]
        for c in nbformat.read(path, as_version=4).cells
        if c.cell_type == "code"
    ]
    first = datetime.fromisoformat(times[0]["iopub.execute_input"])
    last = datetime.fromisoformat(times[-1]["shell.execute_reply"])
    return first, last


def test_all_notebooks_and_solutions_were_executed_in_one_run_in_order():
    spans = [span(path) for path in ALL]
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert end <= start, "notebooks re-executed separately: run scripts/execute_notebooks.py"
    assert spans[-1][1] - spans[0][0] < timedelta(hours=2)


def test_every_takes_line_quotes_the_stored_run_and_its_machine():
    machine = outputs("06_training.ipynb", "hardware_name()").split("|")[0].strip()
    assert "threads" in machine or "GPU" in machine, machine
    for path in ALL:
        header = nbformat.read(path, as_version=4).cells[0].source
        takes = re.search(r"takes:\*\* (?:about )?([\d,]+) s on `([^`]+)`", header)
        assert takes, f"{path.name}: no 'takes:** N s on `MACHINE`' line"
        start, end = span(path)
        seconds = (end - start).total_seconds()
        quoted = float(takes.group(1).replace(",", ""))
        # the quoted time includes the kernel's start, which the cells' timestamps do not
        assert abs(quoted - seconds) <= max(5, 0.15 * seconds), (path.name, quoted, seconds)
        assert takes.group(2) == machine, (path.name, takes.group(2), machine)


def test_06s_stored_run_has_at_least_eight_validation_points():
    """The curves need a validation curve, not a dot: eight evaluations a run (eval_steps=0.125)."""
    log = outputs("06_training.ipynb", "result = trainer.train(")
    assert log.count("eval_accuracy") >= 8, log[-2000:]
