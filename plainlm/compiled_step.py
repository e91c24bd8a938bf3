"""The decode step under torch.compile, saved whole to disk so that later processes start in a second or two.

    step = compile_decode_step(model, "default", token, input_pos=slot)   # compiles, or loads what an earlier run saved
    logits = step(token, input_pos=slot)                                   # each later decode step

generate.py calls this at its first decode step. The compile modes and the options that cut a compiled step's
per-call cost live here too; the KV cache sizing that lets one compiled step serve many prompts lives in
generate.py.

Why a file of our own: plain torch.compile already caches inductor's output on disk, but every new process
still runs dynamo over the Python model (30 layers of SmolLM2-135M) before it can look that cache up. Measured
in a process whose caches were warm (float32 SmolLM2, 2 shared cores): 6.2 s of CPU in the first compiled
step, of which dynamo's tracing took about two thirds, building guards 0.5 s, and loading inductor's output 2.7 s.
`torch.compile(...).aot_compile(...)` (torch >= 2.9) keeps dynamo's result too (the transformed bytecode, the
guards, the graph and inductor's code, 4.4 MB) and `torch.compiler.load_compiled_function` loads it: 2.1 s of
CPU. What is left is importing inductor's runtime and loading the graph's C++ kernels.

What the saved step holds, and what it does not:
- The weights are not in it. The step is `GPT.forward` with the model as its first argument, so every
  parameter and buffer (KV cache included) is an input of the graph, read at each call: one saved step
  serves every model of the same structure (tests/test_compiled_step.py runs one model's step on another).
- Where: `plainlm/` in inductor's own cache folder (TORCHINDUCTOR_CACHE_DIR, default
  /tmp/torchinductor_USER), beside the kernels the step calls; clearing that folder clears both. Loading
  unpickles the file, as inductor unpickles its own cache entries beside it: only ever a file this user's
  own compile wrote into that folder, never a path a user or a checkpoint names (plainlm's rule: no
  unpickling of anything else but tensors).
- Which file: a hash of what the step was compiled from that its guards cannot see: the torch and Python
  versions, plainlm's own source (any edit compiles anew), the compile mode, and the model's structure (its
  config, its modules' classes, each tensor's name, shape, dtype and device, the KV cache's size among them)
  and the example call's shapes. The saved guards then check the model and the inputs at every call, as
  torch.compile's do; a saved step whose guards refuse this model is compiled again and overwritten.
- GPUs keep plain torch.compile too ("reduce-overhead" there means CUDA graphs, which a saved step does not
  capture); this file's saving is measured on the CPU only.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from plainlm.errors import InvalidInput
from plainlm.model import GPT

# A decode step's own cost, outside the kernels, is Python: the compiled graph's wrapper and dynamo's
# guards, run on every step. Measured on int4 SmolLM2-135M, 1 thread (5.6 ms a step before):
# - inductor checks every input's and every kernel output's size, stride and alignment on each call:
#   about 500 checks, 0.5 ms. The graph was traced from these very tensors, and the fake shapes of
#   plainlm's kernels (kernels/__init__.py) are tested against the real ones.
COMPILE_OPTIONS = {"size_asserts": False, "alignment_asserts": False, "scalar_asserts": False}
# - dynamo guards each of the model's ~550 tensors (shape, dtype, aliasing, five attribute checks):
#   0.42 ms. With dict tags it skips the modules whose attribute dicts have not changed since the guards
#   were built: 0.15 ms, as long as the KV cache modules stay too (set_kv_cache reuses them, and the
#   compiled path keeps them between calls); a saved step's guards, loaded under the same setting, take
#   0.07-0.08 ms of CPU a call. skip_guard_eval_unsafe, used before, now costs more. Dynamo reads the
#   setting only while it builds guards: when a step compiles or loads, and at plain torch.compile's first call.
DYNAMO_SETTINGS = {"use_recursive_dict_tags_for_guards": True}
# `compile` takes True (= "default") or a mode. "reduce-overhead" cuts the cost of launching a step's ~300
# kernels: on a GPU, torch.compile's own mode of that name (CUDA graphs); on the CPU, inductor's C++
# wrapper, which runs the step's launch sequence in C++ instead of Python: 0.35 ms less a step on int4
# SmolLM2 here (docs/benchmarks.md). Its first compile takes 1.5-2 minutes on 2 cores instead of about 25 s;
# the step is then saved (above), so later processes load it in seconds.
COMPILE_MODES = ("default", "reduce-overhead")


def check_compile(compile: bool | str) -> str | None:
    """The compile mode `compile` asks for (None: eager), or InvalidInput naming the ones there are."""
    if compile is True or compile is False:
        return "default" if compile else None
    if compile not in COMPILE_MODES:
        raise InvalidInput(f"compile must be True, False or one of {', '.join(COMPILE_MODES)}; got {compile!r}")
    return compile


def compile_decode_step(model: GPT, mode: str, *example: Any, **example_kwargs: Any) -> Callable[..., torch.Tensor]:
    """`model`'s forward compiled for calls like `model(*example, **example_kwargs)`, in one of COMPILE_MODES:
    loaded from the step an earlier run saved for the same structure, else compiled now and saved."""
    if model.embed.weight.device.type != "cpu":
        if mode == "reduce-overhead":
            return torch.compile(model, mode="reduce-overhead", dynamic=False)
        return torch.compile(model, dynamic=False, options=COMPILE_OPTIONS)
    options = {**COMPILE_OPTIONS, "cpp_wrapper": mode == "reduce-overhead"}
    path = saved_step_path(model, mode, example, example_kwargs)
    step = _loaded.get(path) or _load(path, model, example, example_kwargs)
    if step is None:
        with torch._dynamo.config.patch(DYNAMO_SETTINGS):
            compiler = torch.compile(GPT.forward, fullgraph=True, dynamic=False, options=options)
            step = compiler.aot_compile(((model, *example), example_kwargs))
        path.parent.mkdir(parents=True, exist_ok=True)
        step.save_compiled_function(str(path))  # written to a temporary file and renamed: readers never see half
    _loaded[path] = step  # later calls in this process, e.g. the next prompt, skip even the load
    return functools.partial(step, model)


# Saved steps already loaded in this process, by file.
_loaded: dict[Path, Any] = {}


def _load(path: Path, model: GPT, example: tuple, example_kwargs: dict[str, Any]) -> Any | None:
    """The step saved at `path`, or None when there is none or it does not fit this torch or this model."""
    if not path.exists():
        return None
    try:
        with torch._dynamo.config.patch(DYNAMO_SETTINGS), path.open("rb") as file:
            step = torch.compiler.load_compiled_function(file)
    except Exception:  # written by another torch, or cut short: compile anew and overwrite it
        return None
    return step if step.guard_check(model, *example, **example_kwargs) else None


def saved_step_path(model: GPT, mode: str, example: tuple, example_kwargs: dict[str, Any]) -> Path:
    """Where the step compiled for this model structure, mode and call is saved (see the docstring)."""
    digest = hashlib.sha256()
    for part in (torch.__version__, sys.version, _plainlm_source_digest(), mode, repr(model.config)):
        digest.update(part.encode())
    for name, module in model.named_modules():
        digest.update(f"{name} {type(module).__qualname__}".encode())
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype} {tensor.device}".encode())
    for name, value in (*enumerate(example), *sorted(example_kwargs.items())):
        described = value if not isinstance(value, torch.Tensor) else (tuple(value.shape), value.dtype)
        digest.update(f"{name} {described}".encode())
    return _cache_folder() / f"decode-step-{digest.hexdigest()[:32]}.bin"


def _cache_folder() -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir  # inductor's folder, as it resolves it

    return Path(cache_dir()) / "plainlm"


@functools.cache
def _plainlm_source_digest() -> str:
    """A hash of plainlm's Python and C++ source (about 0.5 MB, read once a process)."""
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for file in sorted(root.rglob("*")):
        if file.suffix in (".py", ".cpp", ".h"):
            digest.update(os.fsencode(file.relative_to(root)) + file.read_bytes())
    return digest.hexdigest()
