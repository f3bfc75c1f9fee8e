"""The first lines of every notebook: resolve the config, seed, quiet the libraries, name the output
folder.

Taught in notebook 00 (setup); called at the top of notebooks 01-08.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import huggingface_hub

from helpers.config import PROFILES, CourseConfig, load_config
from helpers.hardware import compute_dtype, device
from helpers.io import REPO_ROOT

# the libraries whose own warnings (deprecations, notes on settings) a lesson does not need
LIBRARIES = (
    r"(torch|transformers|peft|accelerate|bitsandbytes|datasets|huggingface_hub|tqdm|sklearn)"
)


def _warning_line(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line: Any = None
) -> str:
    """A warning as one line, without the file it came from (the same on every machine)."""
    return f"{category.__name__}: {message}\n"


def quiet_libraries() -> None:
    """Keep notebook outputs to what the lesson prints: no library progress bars, info logs or
    warnings. The course's own warnings (a truncated text, an empty one, an incomplete checkpoint,
    a run too big for the GPU) still show."""
    # before the imports below: they import bitsandbytes and tqdm, which warn on import
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", module=LIBRARIES + r"(\.|$)")
    from tqdm import TqdmWarning

    warnings.filterwarnings("ignore", category=TqdmWarning)  # no ipywidgets: text bars instead
    warnings.formatwarning = _warning_line
    for name in ("bitsandbytes", "peft", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def _inline_figures() -> None:
    """``%matplotlib inline`` now, so the first cell that returns a Figure already shows it as an
    image."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None and shell.__class__.__name__ == "ZMQInteractiveShell":
        shell.run_line_magic("matplotlib", "inline")


OUTPUTS_ENV_VAR = "COURSE_OUTPUTS"
COLAB_DRIVE = Path("/content/drive/MyDrive")
KAGGLE_WORKING = Path("/kaggle/working")


def outputs_root() -> Path:
    """Where notebooks save what later notebooks read: ``$COURSE_OUTPUTS`` if set; on Colab with
    Google Drive mounted, ``llama3-course/outputs`` in Drive (it outlives a disconnect); on Kaggle,
    ``/kaggle/working/outputs`` (kept with the notebook's version); else ``notebooks/outputs`` in
    the course (git-ignored)."""
    env = os.environ.get(OUTPUTS_ENV_VAR)
    if env:
        return Path(env)
    if COLAB_DRIVE.is_dir():
        return COLAB_DRIVE / "llama3-course" / "outputs"
    if KAGGLE_WORKING.is_dir():
        return KAGGLE_WORKING / "outputs"
    return REPO_ROOT / "notebooks" / "outputs"


def on_colab() -> bool:
    """True in a Google Colab runtime (its ``google.colab`` package is installed)."""
    try:
        return importlib.util.find_spec("google.colab") is not None
    except ModuleNotFoundError:  # no "google" package at all
        return False


def connect_runtime(config: CourseConfig) -> None:
    """What each notebook needs on a hosted runtime, where every notebook may start a new machine:
    on Colab, Google Drive mounted (the outputs folder, which outlives the session); for a gated
    model without a Hub token, a login from the runtime's secret ``HF_TOKEN`` (Colab's or Kaggle's
    Secrets), else the login box. Skipped where already done, and off Colab and Kaggle."""
    if on_colab() and not os.environ.get(OUTPUTS_ENV_VAR) and not COLAB_DRIVE.is_dir():
        from google.colab import drive  # only on Colab

        drive.mount(str(COLAB_DRIVE.parent))  # /content/drive
    if not PROFILES[config.profile].needs_hub_login or not (on_colab() or KAGGLE_WORKING.is_dir()):
        return
    if huggingface_hub.get_token() is not None:
        return
    try:
        if on_colab():
            from google.colab import userdata

            token = userdata.get("HF_TOKEN")
        else:
            from kaggle_secrets import UserSecretsClient  # only on Kaggle

            token = UserSecretsClient().get_secret("HF_TOKEN")
    except Exception:  # no such secret, or not shared with this notebook
        token = None
    huggingface_hub.login(token=token)  # without a token: the login box asks for one


LOCAL_ENV_VAR = "COURSE_LOCAL_OUTPUTS"


def local_outputs_root() -> Path:
    """Where large files go (merged models, 15-16 GB at the Llama 3 8B shape):
    ``$COURSE_LOCAL_OUTPUTS`` if set; on Colab and Kaggle the runtime's local disk
    (``/content/local-outputs``, ``/tmp/llama3-course``: lost with the session, rebuilt from the
    adapter in minutes), so that Drive's 15 GB and /kaggle/working's 20 GB keep what is small and
    precious; elsewhere the outputs folder itself."""
    env = os.environ.get(LOCAL_ENV_VAR)
    if env:
        return Path(env)
    if COLAB_DRIVE.is_dir():
        return Path("/content/local-outputs")
    if KAGGLE_WORKING.is_dir():
        return Path("/tmp/llama3-course")
    return outputs_root()


def start(profile: str | None = None, **overrides: object) -> tuple[CourseConfig, Path]:
    """Resolve the config, connect a hosted runtime (Drive, Hub login: ``connect_runtime``), seed
    torch/numpy/random, quiet the libraries; returns (config, output folder).

    The output folder is ``<outputs_root()>/<profile>``, shared by the notebooks so that notebook
    07 finds the adapter notebook 06 trained.
    """
    quiet_libraries()  # first: importing transformers below already prints warnings
    _inline_figures()
    from transformers import set_seed

    config = load_config(profile, **overrides)
    connect_runtime(config)
    set_seed(config.seed)
    output_dir = outputs_root() / config.profile
    output_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"profile: {config.profile} | model: {config.model_name} | device: {device().value} | "
        f"compute dtype: {str(compute_dtype().value).removeprefix('torch.')}"
    )
    return config, output_dir
