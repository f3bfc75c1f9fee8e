import numpy as np
import pandas as pd
import pytest

from helpers.plots import (
    plot_class_distribution,
    plot_confusion_matrix,
    plot_token_lengths,
    plot_training_curves,
    smoothed,
)

NAMES = ["World", "Sports", "Business", "Sci/Tech"]


def _png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_smoothing_keeps_a_constant_and_damps_noise():
    assert smoothed([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    noisy = [1.0, 3.0] * 20
    assert max(smoothed(noisy)[10:]) - min(smoothed(noisy)[10:]) < 1.0


def test_every_plot_draws_and_saves(tmp_path):
    splits = {
        "train": pd.DataFrame({"label": [0, 1, 2, 3, 3]}),
        "test": pd.DataFrame({"label": [0, 1]}),
    }
    fig = plot_class_distribution(splits, NAMES, tmp_path / "a.png")
    assert len(fig.axes[0].patches) == 8 and _png(tmp_path / "a.png")
    fig = plot_token_lengths([10, 20, 30, 120], max_length=96, path=tmp_path / "b.png")
    assert fig.axes[0].get_legend().get_texts()[0].get_text() == "max_length = 96" and _png(
        tmp_path / "b.png"
    )
    log = [
        {"step": 1, "loss": 1.4},
        {"step": 2, "loss": 1.0},
        {"step": 2, "eval_loss": 0.9, "eval_accuracy": 0.7, "eval_macro_f1": 0.6},
    ]
    fig = plot_training_curves(log, tmp_path / "c.png", examples_per_step=8)
    # raw and smoothed training loss, validation loss; accuracy and macro-F1
    assert len(fig.axes[0].lines) == 3 and len(fig.axes[1].lines) == 2 and _png(tmp_path / "c.png")
    assert fig.axes[0].get_xlabel() == "examples seen"
    assert list(fig.axes[0].lines[0].get_xdata()) == [8, 16]
    assert fig.axes[1].get_title() == "Validation metrics (1 evaluations)"
    fig = plot_confusion_matrix(
        np.array([[5, 1, 0, 0], [0, 6, 0, 0], [0, 0, 4, 2], [0, 0, 1, 5]]),
        NAMES,
        tmp_path / "d.png",
    )
    assert [t.get_text() for t in fig.axes[0].texts][:2] == ["5", "1"] and _png(tmp_path / "d.png")
