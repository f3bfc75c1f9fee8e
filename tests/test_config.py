import pytest
import torch
import yaml

from helpers.config import PROFILES, ConfigError, CourseConfig, default_profile, load_config, save_config


def test_profiles_name_their_models():
    assert PROFILES["llama3-8b"].model_name == "meta-llama/Meta-Llama-3-8B"
    assert PROFILES["smollm2-cpu"].model_name == "smollm2"
    assert PROFILES["llama3-8b"].data_source == "hub" and PROFILES["smollm2-cpu"].data_source == "local"


def test_default_profile_follows_hardware_then_env(monkeypatch):
    monkeypatch.delenv("COURSE_PROFILE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_profile() == "llama3-8b"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_profile() == "smollm2-cpu"
    monkeypatch.setenv("COURSE_PROFILE", "llama3-8b")
    assert load_config().profile == "llama3-8b"


def test_yaml_and_overrides_apply_in_order(tmp_path, monkeypatch):
    monkeypatch.delenv("COURSE_PROFILE", raising=False)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"profile": "llama3-8b", "lora_r": 4, "epochs": 2}))
    config = load_config(yaml_path=path, epochs=3)
    assert (config.profile, config.model_name, config.lora_r, config.epochs) == ("llama3-8b", PROFILES["llama3-8b"].model_name, 4, 3)
    assert load_config("smollm2-cpu", path).model_name == "smollm2"  # the argument wins over the file's profile


def test_unknown_setting_and_profile_are_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lora_rank: 8\n")
    with pytest.raises(ConfigError, match="lora_rank"):
        load_config("smollm2-cpu", path)
    with pytest.raises(ConfigError, match="Unknown profile 'gpt'"):
        load_config("gpt")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("smollm2-cpu", tmp_path / "missing.yaml")


def test_saved_config_round_trips(tmp_path):
    config = load_config("smollm2-cpu", seed=7)
    path = save_config(config, tmp_path / "run" / "config.yaml")
    assert load_config(yaml_path=path) == config
    assert config.id2label[3] == "Sci/Tech" and config.label2id["Sports"] == 1 and config.num_labels == 4


def test_replace_checks_names():
    assert CourseConfig().replace(batch_size=2).batch_size == 2
    with pytest.raises(ConfigError, match="batchsize"):
        CourseConfig().replace(batchsize=2)
