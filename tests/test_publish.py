"""helpers.publish: upload a run's merged/ or adapter/ through fsspec, verified, with a model card
whose own loading code predicts what the run predicted."""

from __future__ import annotations

import importlib.util
import json
import re

import fsspec
import numpy as np
import pandas as pd
import pytest
import yaml

from helpers.publish import CARD_MARK, publish

CARD_ROWS = 8  # test rows the card's code predicts


def _files(folder):
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def published(default_run, tmp_path_factory):
    """The shared run's merged/ and adapter/, uploaded to a local folder."""
    dest = tmp_path_factory.mktemp("published")
    results = {
        what: publish(default_run["dir"], str(dest / what), what=what, progress=False)
        for what in ("merged", "adapter")
    }
    return {"dir": dest, "results": results}


def test_upload_to_a_folder_reads_back_identical(default_run, published):
    for what in ("merged", "adapter"):
        source = _files(default_run["dir"] / what)
        assert "README.md" in source
        assert _files(published["dir"] / what) == source
        # local files are read back and hashed
        assert published["results"][what]["checked"] == {"sha256 (read back)": len(source)}


def test_upload_to_memory_reads_back_identical(default_run):
    url = "memory://course-publish-test/adapter"
    result = publish(default_run["dir"], url, what="adapter", progress=False)
    fs, root = fsspec.core.url_to_fs(url)
    try:
        copied = {path[len(root) + 1 :]: fs.cat_file(path) for path in fs.find(root)}
        assert copied == _files(default_run["dir"] / "adapter")
        assert result["checked"] == {"sha256 (read back)": len(copied)}
    finally:
        fs.rm(root, recursive=True)


def test_model_cards_quote_the_runs_metrics(default_run):
    run = default_run["dir"]
    metrics = default_run["metrics"]
    for what, library in (("merged", "transformers"), ("adapter", "peft")):
        card = (run / what / "README.md").read_text()  # written by helpers.train
        assert CARD_MARK in card
        header = yaml.safe_load(card.split("---")[1])
        assert header["library_name"] == library
        assert header["pipeline_tag"] == "text-classification"
        assert header["license"] == "apache-2.0"  # SmolLM2
        assert header["datasets"] == ["fancyzhx/ag_news"]
        assert header["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
        for stage in ("baseline", "final", "merged"):
            for name, value in metrics[stage].items():
                assert f"| {stage} | {name} | {value:.4f} |" in card
        assert metrics["hardware"] in card
        assert f"{metrics['train_rows']} train" in card
        assert "non-commercial" in card
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "smollm2"  # not this machine's cache path


def test_second_upload_is_refused_and_leaves_the_first(default_run, run_command, tmp_path):
    dest = tmp_path / "dest"
    first = run_command("helpers.publish", default_run["dir"], dest, "--what", "adapter")
    assert first.returncode == 0, first.stderr
    assert "sha256" in first.stdout
    before = _files(dest)
    second = run_command("helpers.publish", default_run["dir"], dest, "--what", "merged")
    assert second.returncode == 2
    assert "--overwrite" in second.stderr and len(second.stderr.strip().splitlines()) == 1
    assert _files(dest) == before
    (dest / "stale.txt").write_text("from an older upload")
    third = run_command(
        "helpers.publish", default_run["dir"], dest, "--what", "adapter", "--overwrite"
    )
    assert third.returncode == 0, third.stderr
    assert _files(dest) == _files(default_run["dir"] / "adapter")  # the stale file is gone


def test_unknown_protocol_and_missing_package_are_one_line_errors(default_run, run_command):
    unknown = run_command("helpers.publish", default_run["dir"], "nosuchfs://bucket/model")
    assert unknown.returncode == 2
    assert unknown.stderr.strip().splitlines() == [
        "error: unknown storage protocol 'nosuchfs://' in nosuchfs://bucket/model: use gs://, "
        "s3://, hf://, memory:// or a local folder"
    ]
    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    missing = run_command("helpers.publish", default_run["dir"], "gs://bucket/model")
    assert missing.returncode == 2
    assert missing.stderr.strip() == "error: gs:// needs a package: pip install gcsfs"


@pytest.mark.parametrize("what", ["merged", "adapter"])
def test_card_code_predicts_what_was_trained(default_run, published, what):
    """The python code of the published card, run on the published folder, predicts as the run."""
    folder = published["dir"] / what
    card = (folder / "README.md").read_text()
    code = "\n".join(re.findall(r"```python\n(.*?)```", card, flags=re.S))
    texts = default_run["test"]["text"].head(CARD_ROWS).tolist()
    code = re.sub(r"^folder = .*$", f"folder = {str(folder)!r}", code, count=1, flags=re.M)
    code = re.sub(r"^texts = .*$", f"texts = {texts!r}", code, count=1, flags=re.M)
    namespace: dict = {}
    exec(compile(code, f"{what}/README.md", "exec"), namespace)
    logits = namespace["logits"].numpy()
    trained = pd.read_csv(default_run["dir"] / "test_predictions.csv").head(CARD_ROWS)
    assert logits.argmax(1).tolist() == trained["predicted"].tolist()
    expected = trained[[f"logit_{i}" for i in range(logits.shape[1])]].to_numpy()
    # on CPUs with AVX512-BF16, bitsandbytes serves a loaded 4-bit layer through its bf16 kernel
    # (the course keeps the training layout: helpers.modeling.keep_4bit_layers_trainable)
    bf16_kernel = any(
        getattr(m, "support_avx512bf16_for_cpu", False) for m in namespace["model"].modules()
    )
    np.testing.assert_allclose(logits, expected, atol=0.1 if bf16_kernel else 1e-3)


def test_train_checks_the_upload_url_before_any_work(run_command, tmp_path):
    out = tmp_path / "run"
    result = run_command("helpers.train", "--output-dir", out, "--upload", "foo://bucket/x")
    assert result.returncode == 2
    assert "unknown storage protocol 'foo://'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()
