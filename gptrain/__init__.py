"""gptrain: reproduce GPT-2 (124M to 1.5B) and GPT-3 Small from scratch, end to end."""

__version__ = "0.1.0"

from gptrain import openmp  # noqa: E402,F401  first: OpenMP's wait policy must be set before torch loads

from gptrain.tokenizer import get_tokenizer  # noqa: E402  (no torch)

__all__ = ["GPT", "GPTConfig", "PRESETS", "get_tokenizer", "__version__"]


def __getattr__(name: str):
    """The model's names load torch when first used, not on `import gptrain`: the `gptrain` command picks
    OpenMP's wait policy for its subcommand before torch reads it (gptrain/openmp.py)."""
    if name in ("GPT", "GPTConfig", "PRESETS"):
        from gptrain import model
        return getattr(model, name)
    raise AttributeError(f"module 'gptrain' has no attribute {name!r}")
