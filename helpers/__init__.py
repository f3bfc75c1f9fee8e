"""Shared code of the course "Fine-tuning Llama 3 for text classification".

Each module names the notebook that teaches it; notebooks import explicit names, e.g.
``from helpers.data import balanced_split``.
"""

__version__ = "0.1.0"
