"""Shared code of the course "Fine-tuning Llama 3 for text classification".

Each module names the notebook that teaches it; notebooks import explicit names, e.g.
``from helpers.data import balanced_split``.
"""

__version__ = "0.1.0"

import logging as _logging
import os as _os
import sys as _sys
import warnings as _warnings

# Kaggle shows a notebook two T4s; the Trainer would then split each batch over both in one process
# (DataParallel, which a 4-bit model cannot use) and double the batch. A notebook uses one GPU; two
# processes (`accelerate launch -m helpers.train`) use both. Set before torch starts.
if (
    "ipykernel" in _sys.modules
    and "torch" not in _sys.modules
    and "LOCAL_RANK" not in _os.environ
    and "CUDA_VISIBLE_DEVICES" not in _os.environ
):
    _os.environ["CUDA_VISIBLE_DEVICES"] = "0"


class _MissingKernelsNote(_logging.Filter):
    """bitsandbytes logs on every import, on CPUs with AVX512-BF16, that the optional ``kernels``
    package for its repacked CPU inference is missing; the course keeps the training layout
    instead (``helpers.modeling.keep_4bit_layers_trainable``), so the line is noise. Only that line
    is dropped: the logger's other messages still show."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward")


_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_MissingKernelsNote())

# tqdm, imported by the libraries in a Jupyter kernel without ipywidgets, warns that it draws text
# bars instead of widgets: that line only, wherever it is imported first
_warnings.filterwarnings("ignore", message="IProgress not found")

# COURSE_SIMULATE_GPU=t4: the process answers and fits as a free Colab T4 would (tests and CI)
if _os.environ.get("COURSE_SIMULATE_GPU"):
    from helpers.simulated_gpu import start as _start_simulation

    _start_simulation()
