"""Bad input gets a one-line error naming the problem and the fix, and leaves no partial output."""

import json
import os
import sys
from pathlib import Path

import pytest

from helpers.config import load_config
from helpers.io import atomic_directory, atomic_write_json
from helpers.modeling import ModelError, load_classifier
from helpers.training import last_checkpoint, mean_training_loss

REPO = Path(__file__).resolve().parents[1]


def _one_line_error(result, *phrases):
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    message = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(message) == 1, result.stderr[-3000:]
    for phrase in phrases:
        assert phrase in message[0], message[0]


def test_train_with_a_split_too_large_writes_nothing(tmp_path, run_command):
    (tmp_path / "big.yaml").write_text("train_per_class: 1600\n")
    result = run_command(
        "helpers.train", "--config", tmp_path / "big.yaml", "--output-dir", tmp_path / "run"
    )
    _one_line_error(result, "Lower the per-class counts")
    assert not (tmp_path / "run").exists()


def test_train_on_a_gated_model_without_token_writes_nothing(tmp_path, run_command, monkeypatch):
    import huggingface_hub.constants

    (tmp_path / "gated.yaml").write_text("model_name: meta-llama/Meta-Llama-3-8B\n")
    # offline as HF_HUB_OFFLINE=1 makes it (read once, when huggingface_hub is imported)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_TOKEN", "")
    result = run_command(
        "helpers.train", "--config", tmp_path / "gated.yaml", "--output-dir", tmp_path / "run"
    )
    _one_line_error(result, "hf auth login", "COURSE_PROFILE=smollm2-cpu")
    assert not (tmp_path / "run").exists()


def test_train_with_a_misspelt_setting_names_it(tmp_path, run_command):
    (tmp_path / "typo.yaml").write_text("lerning_rate: 0.001\n")
    result = run_command(
        "helpers.train", "--config", tmp_path / "typo.yaml", "--output-dir", tmp_path / "run"
    )
    _one_line_error(result, "lerning_rate", "Fix the spelling")
    assert not (tmp_path / "run").exists()


def test_4bit_without_bitsandbytes_says_how_to_fix(cpu_config, monkeypatch):
    # import fails as on a machine without it
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ModelError, match="pip install bitsandbytes.*load_in_4bit=False"):
        load_classifier(cpu_config)


def test_atomic_json_keeps_the_old_file_when_the_write_dies(tmp_path, monkeypatch):
    path = atomic_write_json(tmp_path / "metrics.json", {"accuracy": 0.87})

    def crash(_fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_json(path, {"accuracy": 0.1})
    assert json.loads(path.read_text()) == {"accuracy": 0.87}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left behind


def test_atomic_directory_keeps_the_old_model_when_saving_dies(tmp_path):
    folder = tmp_path / "merged"
    with atomic_directory(folder) as tmp:
        (tmp / "model.safetensors").write_text("old")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_directory(folder) as tmp:
            (tmp / "model.safetensors").write_text("half")
            raise RuntimeError("killed mid-save")
    assert (folder / "model.safetensors").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_last_checkpoint_skips_one_cut_off_mid_save(tmp_path):
    assert last_checkpoint(tmp_path / "missing") is None
    for step in (3, 6, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
    for step in (3, 6):
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    with pytest.warns(UserWarning, match="checkpoint-10 is incomplete"):
        assert last_checkpoint(tmp_path).name == "checkpoint-6"


def test_mean_training_loss_weights_each_log_by_its_steps():
    log = [
        {"loss": 2.0, "step": 1},
        {"loss": 1.0, "step": 5},
        {"eval_loss": 9.0, "step": 5},
        {"loss": 0.5, "step": 9},
    ]
    assert mean_training_loss(log) == pytest.approx((2.0 + 4 * 1.0 + 4 * 0.5) / 9)
    with pytest.raises(ValueError, match="no training loss"):
        mean_training_loss([{"eval_loss": 1.0, "step": 3}])


def test_profile_settings_include_a_checkpoint_interval():
    assert load_config("smollm2-cpu").save_steps > 0 and load_config("llama3-8b").save_steps > 0


def test_failed_overwrite_keeps_the_finished_run(tmp_path, run_command):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text('{"final": {"accuracy": 0.87}}')
    (tmp_path / "big.yaml").write_text("train_per_class: 1600\n")
    result = run_command(
        "helpers.train", "--config", tmp_path / "big.yaml", "--output-dir", run, "--overwrite"
    )
    _one_line_error(result, "Lower the per-class counts")
    assert json.loads((run / "metrics.json").read_text())["final"]["accuracy"] == 0.87
