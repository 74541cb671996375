"""gptrain: reproduce GPT-2 (124M to 1.5B) and GPT-3 Small from scratch, end to end."""

__version__ = "0.1.0"

from gptrain import openmp  # noqa: E402,F401  first: OpenMP's wait policy must be set before torch loads

from gptrain.model import GPT, GPTConfig, PRESETS  # noqa: E402
from gptrain.tokenizer import get_tokenizer  # noqa: E402

__all__ = ["GPT", "GPTConfig", "PRESETS", "get_tokenizer", "__version__"]
