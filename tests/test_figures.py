"""The four pictures of the course's ideas: drawn by scripts/draw_figures.py, committed in
notebooks/figures/, and shown (as cell attachments) where each idea is taught."""

import base64
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
from matplotlib.image import imread

REPO = Path(__file__).resolve().parents[1]
FIGURES = REPO / "notebooks" / "figures"
SHOWN_IN = {
    "course_pipeline.png": "00_setup.ipynb",
    "nf4_levels.png": "03_loading_in_4bit.ipynb",
    "last_token.png": "03_loading_in_4bit.ipynb",
    "lora_update.png": "04_lora.ipynb",
}


def attachments() -> dict[str, list[tuple[str, bytes]]]:
    """figure name -> [(notebook, attached bytes)] over every notebook's markdown cells."""
    found: dict[str, list[tuple[str, bytes]]] = {}
    for path in sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            for name, data in cell.get("attachments", {}).items():
                assert cell.cell_type == "markdown" and f"(attachment:{name})" in cell.source
                found.setdefault(name, []).append((path.name, base64.b64decode(data["image/png"])))
    return found


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    folder = tmp_path_factory.mktemp("figures")
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "draw_figures.py"), str(folder)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return folder


def test_the_script_draws_the_four_committed_pictures(drawn):
    assert sorted(p.name for p in drawn.glob("*.png")) == sorted(SHOWN_IN)
    for name in SHOWN_IN:
        committed = FIGURES / name
        assert committed.stat().st_size < 150_000, name
        # the same pixels (the compressed bytes may differ with another zlib)
        assert np.array_equal(imread(drawn / name), imread(committed)), f"{name}: redraw it"


def test_each_notebook_shows_the_committed_picture_where_the_idea_is_taught():
    found = attachments()
    assert sorted(found) == sorted(SHOWN_IN)
    for name, notebook in SHOWN_IN.items():
        assert found[name] == [(notebook, (FIGURES / name).read_bytes())], (
            f"{name}: run `python scripts/draw_figures.py --embed`"
        )


def test_the_nf4_picture_uses_bitsandbytes_own_levels():
    import bitsandbytes.functional as bnbf

    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from draw_figures import NF4
    finally:
        sys.path.remove(str(REPO / "scripts"))
    levels = bnbf.get_4bit_type("nf4", device="cpu").tolist()
    assert levels == pytest.approx(NF4, abs=1e-7) and len(NF4) == 16
