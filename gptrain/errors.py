"""User-facing errors: one clear line that names the thing, the value and the fix; the CLI prints it without a traceback."""

from __future__ import annotations

import importlib


class GptrainError(RuntimeError):
    """An error caused by the user's input or environment, with a message that says what to do."""


EXTRAS = {  # python module -> the pip extra that installs it
    "transformers": "hf",
    "huggingface_hub": "hf",
    "datasets": "data",
    "lm_eval": "eval",
    "matplotlib": "report",
    "fastapi": "serve",
    "uvicorn": "serve",
    "prometheus_client": "serve",
}


def require(module: str, purpose: str):
    """Import an optional dependency, or stop with a line naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = EXTRAS.get(module, module)
        raise GptrainError(f"{purpose} needs the optional package {module!r}: pip install 'gptrain[{extra}]'") from None
