"""Execute the course notebooks in place, so the committed outputs are those of a real run.

    python scripts/execute_notebooks.py [NOTEBOOK ...]
        default: every notebooks/NN_*.ipynb, then every notebooks/solutions/*.ipynb

Run it on the offline profile (COURSE_PROFILE=smollm2-cpu) before committing notebooks: the tests
(pytest --nbval) compare the checked outputs against these. The solutions come last: some read
what the chapters saved (07's need 06's adapter and 07's merged model; 08's need 06-08's).
Each header's "**takes:** N s on `MACHINE`" is rewritten with the time its cells took in this run
and ``hardware_name()``, so the quoted time is always the stored run's.
"""

from __future__ import annotations

import re
import sys
from datetime import datetime
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from helpers.hardware import hardware_name

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SOLUTIONS = NOTEBOOKS / "solutions"


def default_notebooks() -> list[Path]:
    """The chapters in order, then their solutions in order."""
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")) + sorted(SOLUTIONS.glob("*.ipynb"))


TAKES = re.compile(r"(\*\*takes:\*\* )(?:about )?[\d,]+ s on `[^`]+`")


def cells_seconds(notebook: nbformat.NotebookNode) -> int:
    """Seconds from the first code cell's start to the last one's end (nbclient's timestamps)."""
    times = [c.metadata["execution"] for c in notebook.cells if c.cell_type == "code"]
    first = datetime.fromisoformat(times[0]["iopub.execute_input"])
    last = datetime.fromisoformat(times[-1]["shell.execute_reply"])
    return round((last - first).total_seconds())


def main(paths: list[str]) -> int:
    notebooks = [Path(p) for p in paths] or default_notebooks()
    machine = hardware_name()
    for path in notebooks:
        notebook = nbformat.read(path, as_version=4)
        if not TAKES.search(notebook.cells[0].source):
            sys.exit(f"error: {path.name}'s first cell has no '**takes:** N s on `MACHINE`' line")
        NotebookClient(
            notebook,
            timeout=1800,
            kernel_name="python3",
            resources={"metadata": {"path": str(path.parent)}},
        ).execute()
        seconds = cells_seconds(notebook)
        notebook.cells[0].source = TAKES.sub(
            rf"\g<1>{seconds:,} s on `{machine}`", notebook.cells[0].source
        )
        nbformat.write(notebook, path)
        print(f"{path.name}: {seconds} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
