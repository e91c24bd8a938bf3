"""plainlm: readable PyTorch for pretraining, finetuning and running large language models."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from plainlm.api import LLM
    from plainlm.config import Config
    from plainlm.model import GPT

__all__ = ["LLM", "Config", "GPT"]

# Imported on first use: `import plainlm` (and so `plainlm --help`) must not wait seconds for torch.
_LAZY = {"LLM": "plainlm.api", "Config": "plainlm.config", "GPT": "plainlm.model"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'plainlm' has no attribute {name!r}")
