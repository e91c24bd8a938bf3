"""plainlm: readable PyTorch for pretraining, finetuning and running large language models."""

from plainlm.api import LLM
from plainlm.config import Config
from plainlm.model import GPT

__all__ = ["LLM", "Config", "GPT"]
