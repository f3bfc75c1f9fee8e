"""Execute the course notebooks in place, so the committed outputs are those of a real run.

    python scripts/execute_notebooks.py [NOTEBOOK ...]
        default: every notebooks/NN_*.ipynb, then every notebooks/solutions/*.ipynb

Run it on the offline profile (COURSE_PROFILE=smollm2-cpu) before committing notebooks: the tests
(pytest --nbval) compare the checked outputs against these. The solutions come last: some read
what the chapters saved (07's need 06's adapter and 07's merged model; 08's need 06-08's).
Each header's "**takes:** N s on `MACHINE`" is rewritten with the time its cells took in this run
and ``hardware_name()``, so the quoted time is always the stored run's; each chapter's estimate on a
free Colab T4 with Llama 3 8B is copied from its row in docs/performance.md (``t4_estimates``).

    python scripts/execute_notebooks.py --estimates-only   # copy the T4 estimates, execute nothing
"""

from __future__ import annotations

import re
import sys
from datetime import datetime
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from helpers.hardware import hardware_name

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
SOLUTIONS = NOTEBOOKS / "solutions"


def default_notebooks() -> list[Path]:
    """The chapters in order, then their solutions in order."""
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")) + sorted(SOLUTIONS.glob("*.ipynb"))


TAKES = re.compile(r"(\*\*takes:\*\* )(?:about )?[\d,]+ s on `[^`]+`")
T4_LINE = re.compile(r"\n\n\*\*On a free Colab T4 with Llama 3 8B:\*\*[^\n]*")
T4_TABLE = "<!-- t4-estimates"
T4_ANCHOR = "../docs/performance.md#the-notebooks-on-a-free-colab-t4-with-llama-3-8b-estimates"


def t4_estimates() -> dict[str, str]:
    """Each chapter's estimated time on a free Colab T4 with Llama 3 8B (docs/performance.md)."""
    text = (REPO / "docs" / "performance.md").read_text()
    table = text[text.index(T4_TABLE) :].split("\n\n")[0].splitlines()[3:]
    return {row.split("|")[1].strip(): row.split("|")[3].strip() for row in table}


def t4_line(stem: str, estimates: dict[str, str]) -> str:
    return (
        f"\n\n**On a free Colab T4 with Llama 3 8B:** about {estimates[stem]} in a new runtime, "
        f"an estimate ([docs/performance.md]({T4_ANCHOR}))."
    )


def with_t4_estimate(source: str, stem: str, estimates: dict[str, str]) -> str:
    """A chapter's first cell with its T4 estimate as the line after the "Runs on" paragraph."""
    source = T4_LINE.sub("", source)
    if stem not in estimates:
        return source
    start = source.index("**Runs on:**")
    end = source.find("\n\n", start)
    end = len(source) if end < 0 else end
    return source[:end] + t4_line(stem, estimates) + source[end:]


def cells_seconds(notebook: nbformat.NotebookNode) -> int:
    """Seconds from the first code cell's start to the last one's end (nbclient's timestamps)."""
    times = [c.metadata["execution"] for c in notebook.cells if c.cell_type == "code"]
    first = datetime.fromisoformat(times[0]["iopub.execute_input"])
    last = datetime.fromisoformat(times[-1]["shell.execute_reply"])
    return round((last - first).total_seconds())


def main(paths: list[str]) -> int:
    estimates = t4_estimates()
    if paths == ["--estimates-only"]:
        for path in default_notebooks():
            notebook = nbformat.read(path, as_version=4)
            notebook.cells[0].source = with_t4_estimate(
                notebook.cells[0].source, path.stem, estimates
            )
            nbformat.write(notebook, path)
        return 0
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
        notebook.cells[0].source = with_t4_estimate(
            TAKES.sub(rf"\g<1>{seconds:,} s on `{machine}`", notebook.cells[0].source),
            path.stem,
            estimates,
        )
        nbformat.write(notebook, path)
        print(f"{path.name}: {seconds} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
