"""plainlm: readable PyTorch for pretraining, finetuning and running large language models."""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from plainlm.api import LLM
    from plainlm.config import Config
    from plainlm.model import GPT

__all__ = ["LLM", "Config", "GPT", "__version__"]

try:  # the one source is pyproject.toml's `version`, as installed (pip install -e . included)
    __version__ = importlib.metadata.version("plainlm")
except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

# Imported on first use: `import plainlm` (and so `plainlm --help`) must not wait seconds for torch.
_LAZY = {"LLM": "plainlm.api", "Config": "plainlm.config", "GPT": "plainlm.model"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'plainlm' has no attribute {name!r}")
