"""Draw the course's four pictures of its ideas into notebooks/figures/ (or the folder given).

    python scripts/draw_figures.py [FOLDER]
    python scripts/draw_figures.py --embed    redraw into notebooks/figures, then put the new
                                              bytes into the notebook cells that show them

- lora_update.png       LoRA's update: a frozen W plus B·A, with the parameter counts for r=16 on a
                        4096-wide layer (notebook 04)
- nf4_levels.png        NF4's 16 levels against the normal density they are the quantiles of
                        (notebook 03)
- last_token.png        why the class is read at the last real token under causal attention, with
                        the right padding the course uses (notebook 03)
- course_pipeline.png   the course's steps with their notebooks (notebook 00)

Matplotlib only, no randomness and no timestamps, so the same versions draw the same bytes. The
notebooks embed these files as cell attachments (so they show on Colab too); after changing a
picture, run it with --embed (tests/test_figures.py checks that the notebooks show these bytes).
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path
from statistics import NormalDist

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, Rectangle  # noqa: E402

FIGURES = Path(__file__).resolve().parents[1] / "notebooks" / "figures"
DPI = 100
# bitsandbytes' NF4 code book (bitsandbytes.functional.get_4bit_type("nf4"), 0.50.2; QLoRA's
# create_normal_map(offset=0.9677083)), copied so that drawing needs no torch; a test compares.
NF4 = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
NF4_OFFSET = 0.9677083  # the outermost quantile: its z-score is scaled to 1
FROZEN, TRAINED, ACCENT, MUTED = "#9aa5b1", "#f28e2b", "#4e79a7", "#d9d9d9"


def _save(fig: plt.Figure, folder: Path, name: str) -> Path:
    path = folder / name
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    plt.close(fig)
    return path


def _box(ax, x, y, w, h, color, text="", fontsize=10, **kwargs):
    ax.add_patch(Rectangle((x, y), w, h, facecolor=color, edgecolor="black", lw=1, **kwargs))
    if text:
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize)


def lora_update(folder: Path) -> Path:
    """W (d x d, frozen) + (alpha/r) B (d x r) A (r x d), r drawn wider than to scale."""
    d, r = 4096, 16
    full, low = d * d, 2 * d * r
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.set_xlim(0, 10)
    ax.set_ylim(-1.2, 4.2)
    ax.set_axis_off()
    _box(ax, 0.2, 0.5, 3.2, 3.2, FROZEN, "W\nfrozen, 4-bit\n\nd × d", fontsize=12)
    ax.text(3.85, 2.1, "+", fontsize=24, ha="center", va="center")
    ax.text(4.75, 2.1, "α/r ·", fontsize=13, ha="center", va="center")
    _box(ax, 5.4, 0.5, 0.45, 3.2, TRAINED, "B\n\nd\n×\nr", fontsize=10)
    ax.text(6.15, 2.1, "·", fontsize=24, ha="center", va="center")
    _box(ax, 6.45, 3.25, 3.2, 0.45, TRAINED, "A    r × d", fontsize=10)
    ax.text(
        8.05,
        2.2,
        "B starts at zero, so\ntraining starts from W;\nonly A and B learn",
        ha="center",
        va="center",
        fontsize=10,
    )
    ax.text(1.8, 0.2, f"{full:,} weights (d = {d:,})", ha="center", va="top", fontsize=10)
    ax.text(
        7.5,
        0.2,
        f"{d * r:,} + {r * d:,} = {low:,} weights (r = {r})",
        ha="center",
        va="top",
        fontsize=10,
    )
    ax.text(
        5.0,
        -0.75,
        f"One {d:,}-wide layer: LoRA trains {low:,} numbers, {low / full:.2%} of W's "
        f"{full:,}.\nMerging adds the update once: W' = W + (α/r)·B·A  (r is drawn wider than "
        "to scale)",
        ha="center",
        va="center",
        fontsize=10,
    )
    ax.set_title("LoRA: a frozen weight plus a trained low-rank update", fontsize=13)
    fig.tight_layout()
    return _save(fig, folder, "lora_update.png")


def nf4_levels(folder: Path) -> Path:
    """The 16 NF4 levels on the density of N(0, sigma), sigma such that the outermost quantile
    lands on 1 (a block is scaled by its largest |w|); evenly spaced int4 levels below."""
    normal = NormalDist()
    sigma = 1 / normal.inv_cdf(NF4_OFFSET)
    density = NormalDist(0, sigma)
    xs = [-1.15 + 2.3 * i / 400 for i in range(401)]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.fill_between(xs, [density.pdf(x) for x in xs], color=MUTED, label="weights in a block")
    top = density.pdf(0)
    for i, level in enumerate(NF4):
        ax.plot([level, level], [0, density.pdf(level)], color=ACCENT, lw=1.5)
        label = "NF4's 16 levels (bitsandbytes)" if i == 0 else None
        ax.plot(level, density.pdf(level), "o", color=ACCENT, ms=5, label=label)
    uniform = [-1 + 2 * i / 15 for i in range(16)]
    ax.plot(
        uniform,
        [-0.08 * top] * 16,
        "|",
        color="black",
        ms=12,
        label="16 evenly spaced levels, for comparison",
    )
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlim(-1.15, 1.15)
    ax.set_ylim(-0.16 * top, 1.45 * top)
    ax.set_yticks([])
    ax.set_xlabel("weight / largest |weight| in its block of 64")
    ax.set_title(
        "NF4: 16 levels at the quantiles of a normal distribution, dense where weights are",
        fontsize=11,
    )
    ax.legend(loc="upper right", fontsize=9, frameon=False)
    ax.text(
        -1.12,
        1.42 * top,
        "4 bits = 16 levels: half a byte per weight,\nplus one scale per block "
        "(itself quantized:\ndouble quantization). Exact zero is a level.",
        fontsize=9,
        va="top",
    )
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    return _save(fig, folder, "nf4_levels.png")


def last_token(folder: Path) -> Path:
    """The causal mask over one right-padded row; the score head reads the last real token."""
    tokens = ["Oil", "prices", "climb", "as", "supply", "tightens", "<pad>", "<pad>"]
    real = 6
    n = len(tokens)
    fig, ax = plt.subplots(figsize=(9, 5))
    ax.set_xlim(-1.8, n + 5.4)
    ax.set_ylim(n + 1.4, -1.6)
    ax.set_axis_off()
    for q in range(n):
        for k in range(n):
            if q >= real or k >= real:
                color = "white" if k > q else MUTED
            elif k <= q:
                color = TRAINED if q == real - 1 else ACCENT
            else:
                color = "white"
            ax.add_patch(Rectangle((k, q), 1, 1, facecolor=color, edgecolor="#555555", lw=0.6))
    for i, token in enumerate(tokens):
        style = "italic" if i >= real else "normal"
        ax.text(i + 0.5, -0.15, token, rotation=45, ha="left", va="bottom", fontsize=9, style=style)
        ax.text(-0.15, i + 0.5, token, ha="right", va="center", fontsize=9, style=style)
    ax.text(n / 2, -1.35, "keys: the tokens it can attend to", ha="center", fontsize=10)
    ax.text(
        -1.5,
        n / 2,
        "queries: each row is one token's hidden state",
        rotation=90,
        ha="center",
        va="center",
        fontsize=10,
    )
    arrow = FancyArrowPatch(
        (n + 0.1, real - 0.5), (n + 1.5, real - 0.5), arrowstyle="-|>", mutation_scale=15, lw=1.5
    )
    ax.add_patch(arrow)
    _box(ax, n + 1.55, real - 1.1, 2.6, 1.2, TRAINED, "score head\nhidden → 4 logits", 9)
    ax.text(
        n + 0.3,
        -0.9,
        "Causal attention: a token sees\nitself and the tokens before it.\n\n"
        "Only the last real token has\nseen the whole headline, so the\n"
        "classifier reads its hidden state.\n\nThe course pads on the right;\n"
        "the model finds the last token\nthat is not the pad token.",
        fontsize=9,
        va="top",
    )
    ax.text(
        n / 2,
        n + 0.55,
        "blue: attended   orange: the row the head reads   grey: padding",
        ha="center",
        va="top",
        fontsize=9,
    )
    fig.suptitle("Last-token classification under causal attention", fontsize=13)
    fig.tight_layout()
    return _save(fig, folder, "last_token.png")


STEPS = [
    ("data", "01", "AG News, 4 topics"),
    ("balance", "01", "seeded balanced split"),
    ("class weights", "02", "weighted loss"),
    ("4-bit load", "03", "NF4 + score head"),
    ("LoRA", "04", "adapters, r = 16"),
    ("baseline", "05", "untrained head"),
    ("train", "06", "weighted Trainer"),
    ("evaluate", "07", "against the baseline"),
    ("merge", "07", "into 16 bits, checked"),
    ("predict · publish", "07", "new headlines, upload"),
]


def course_pipeline(folder: Path) -> Path:
    """The course's steps in two rows of five, each with its notebook."""
    fig, ax = plt.subplots(figsize=(10, 3.6))
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 3.6)
    ax.set_axis_off()
    w, h = 1.6, 0.95
    positions = [(0.2 + 2 * i, 2.2) for i in range(5)] + [(0.2 + 2 * i, 0.55) for i in range(5)]
    for i, ((name, notebook, detail), (x, y)) in enumerate(zip(STEPS, positions, strict=True)):
        color = TRAINED if name in ("LoRA", "train") else ACCENT
        _box(ax, x, y, w, h, color, alpha=0.9)
        ax.text(x + w / 2, y + h - 0.2, name, ha="center", va="center", fontsize=10, weight="bold")
        ax.text(x + w / 2, y + h / 2 - 0.05, detail, ha="center", va="center", fontsize=8)
        ax.text(
            x + w / 2,
            y + 0.15,
            f"notebook {notebook}",
            ha="center",
            va="center",
            fontsize=8,
            style="italic",
        )
        if i in (4, 9):
            continue
        nx, ny = positions[i + 1]
        ax.add_patch(
            FancyArrowPatch(
                (x + w, y + h / 2), (nx, ny + h / 2), arrowstyle="-|>", mutation_scale=12
            )
        )
    x4, y4 = positions[4]
    x5, y5 = positions[5]
    ax.add_patch(
        FancyArrowPatch((x4 + w / 2, y4), (x5 + w / 2, y5 + h), arrowstyle="-|>", mutation_scale=12)
    )
    ax.text(
        5,
        3.45,
        "The course's pipeline (notebook 00: setup; 08: the same split as "
        "instructions, a generative classifier)",
        ha="center",
        va="center",
        fontsize=10,
    )
    fig.tight_layout()
    return _save(fig, folder, "course_pipeline.png")


DRAWINGS = (lora_update, nf4_levels, last_token, course_pipeline)


def embed(figures: Path = FIGURES) -> list[str]:
    """Put each figure's bytes into the markdown cells of the notebooks that attach it (by file
    name); returns the notebooks changed. Markdown attachments only: code cells are untouched."""
    import nbformat

    changed = []
    for path in sorted(figures.parent.glob("[0-9][0-9]_*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        before = nbformat.writes(notebook)
        for cell in notebook.cells:
            for name in cell.get("attachments", {}) if cell.cell_type == "markdown" else {}:
                data = base64.b64encode((figures / name).read_bytes()).decode("ascii")
                cell.attachments[name] = {"image/png": data}
        if nbformat.writes(notebook) != before:
            nbformat.write(notebook, path)
            changed.append(path.name)
    return changed


def main(argv: list[str]) -> int:
    embedding = "--embed" in argv
    argv = [arg for arg in argv if arg != "--embed"]
    if embedding and argv:
        raise SystemExit("--embed draws into notebooks/figures: give no folder")
    folder = Path(argv[0]) if argv else FIGURES
    folder.mkdir(parents=True, exist_ok=True)
    plt.rcParams.update({"svg.hashsalt": "course", "font.family": "DejaVu Sans"})
    for draw in DRAWINGS:
        path = draw(folder)
        print(f"{path} ({path.stat().st_size / 1024:.0f} KB)")
    if embedding:
        print("re-embedded in:", ", ".join(embed(folder)) or "nothing (already current)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
