import pytest
import torch
import yaml

from helpers.config import (
    PROFILES,
    ConfigError,
    CourseConfig,
    Profile,
    default_profile,
    load_config,
    profile_names,
    save_config,
)


def test_profiles_name_their_models():
    assert PROFILES["llama3-8b"].model_name == "meta-llama/Meta-Llama-3-8B"
    assert PROFILES["smollm2-cpu"].model_name == "smollm2"
    assert (
        PROFILES["llama3-8b"].config().data_source == "hub"
        and PROFILES["smollm2-cpu"].config().data_source == "local"
    )
    assert PROFILES["llama3-8b"].needs_hub_login and not PROFILES["smollm2-cpu"].needs_hub_login
    # a profile's settings name only what differs from CourseConfig's defaults
    for profile in PROFILES.values():
        assert all(
            getattr(CourseConfig(), key) != value for key, value in profile.settings.items()
        ), profile.name


def test_a_new_profile_is_one_entry(monkeypatch, capsys):
    """Adding a profile: one Profile in PROFILES; configs, the default, help texts and the bench
    read it."""
    from benchmarks import bench
    from helpers import train

    llama_1b = Profile(
        name="llama3.2-1b",
        description="Llama 3.2 1B in 4-bit, on a T4",
        model_name="meta-llama/Llama-3.2-1B",
        train_per_class=1000,
        val_per_class=100,
        test_per_class=250,
        needs_hub_login=True,
        settings={"data_source": "hub", "max_length": 128},
        instruct={"alpaca_general_rows": 500},
        bench_sizes=(200, 100),
    )
    monkeypatch.setitem(PROFILES, llama_1b.name, llama_1b)
    monkeypatch.delenv("COURSE_PROFILE", raising=False)
    config = load_config("llama3.2-1b", lora_r=8)
    assert (
        config.profile,
        config.model_name,
        config.train_per_class,
        config.max_length,
        config.lora_r,
    ) == ("llama3.2-1b", "meta-llama/Llama-3.2-1B", 1000, 128, 8)
    assert config.learning_rate == CourseConfig().learning_rate  # not named: the default
    assert load_config("llama3.2-1b", task="instruct").alpaca_general_rows == 500
    assert "llama3.2-1b" in profile_names()
    calls = []
    monkeypatch.setattr(
        bench,
        "run",
        lambda config, out, train_rows, test_rows: calls.append(
            (config.profile, train_rows, test_rows)
        ),
    )
    assert bench.main(["--profile", "llama3.2-1b", "--output-dir", "/tmp/unused"]) == 0
    assert calls == [("llama3.2-1b", 200, 100)]
    for command in (train.main, bench.main):
        with pytest.raises(SystemExit):
            command(["--help"])
        assert "llama3.2-1b" in capsys.readouterr().out


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
    assert (config.profile, config.model_name, config.lora_r, config.epochs) == (
        "llama3-8b",
        PROFILES["llama3-8b"].model_name,
        4,
        3,
    )
    # the argument wins over the file's profile
    assert load_config("smollm2-cpu", path).model_name == "smollm2"


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
    assert (
        config.id2label[3] == "Sci/Tech"
        and config.label2id["Sports"] == 1
        and config.num_labels == 4
    )


def test_replace_checks_names():
    assert CourseConfig().replace(batch_size=2).batch_size == 2
    with pytest.raises(ConfigError, match="batchsize"):
        CourseConfig().replace(batchsize=2)
