"""plainlm's own CPU kernels for decoding, in C++ beside this file, compiled on first use.

    if int4_kernel_fits(out_features, in_features, group_size):
        y = torch.ops.plainlm.int4_matmul(x, tile_nibbles(nibbles), scales_and_zeros, group_size)
        qkv = torch.ops.plainlm.int4_matmuls(x, [q_tiles, k_tiles, v_tiles], [q_sz, k_sz, v_sz], group_size)
    if int8_kernel_fits(out_features, in_features):
        y = torch.ops.plainlm.int8_matmul(x, tile_int8(weight), scales)
    if int8_kernel_fits(out_features, in_features, group_size):  # (scale, zero) pairs per group: 8-bit GPTQ
        y = torch.ops.plainlm.int8_group_matmul(x, tile_int8(weight), scales_and_zeros, group_size)
    if decode_attention_fits(head_dim) and decode_attention_takes(k_cache):
        y = torch.ops.plainlm.decode_attention(q, k_cache, v_cache, mask, scale)
        y = torch.ops.plainlm.paged_attention(q, k_pool, v_pool, rows, mask, scale)  # serve's pool

The modules that call them: quantize.py's int8/int4 layers, and kernel_layers.py's attention, MLP and
linear layers.

int4_matmul.cpp       x @ W^T for int4 and int8 weights in 16-row tiles (quantize.tile_nibbles,
int8_matmul.cpp       tile_int8), with AVX512-VNNI integer dot products on activations rounded
                      to int8: decoding at memory speed. int8 comes with a scale per row
                      (int8_matmul) or (scale, zero) pairs per group (int8_group_matmul). The
                      *_matmuls forms take several weights that read one input (q, k, v) in one
                      call, their outputs side by side.
vnni_common.h         what the two share.
decode_attention.cpp  new tokens' attention over a KV cache, visiting only the unmasked slots:
                      one pass over the keys a token for a few queries, tiles of queries (two
                      small matrix products each) for many; paged_attention reads the serving
                      engine's paged pool in place the same way.
rows_matmul.cpp       float32 x @ W^T for up to 16 rows of x (a decode step, a speculative
                      verification): each weight row read once, every output one fixed-order dot
                      product, so a row's bits do not depend on the rows beside it. AVX2 and FMA
                      only: a library of its own (FP32_NAME), built on CPUs the others skip.

Each file's header gives its math. Batch-1 decoding spends its time in these kernels and in
per-call overhead; llama.cpp, the peer to beat, is C throughout. The matmuls split a matrix across
torch's threads by blocks of 16 rows (a share is at least 64 KB of weights), so any thread count
gives the same bits.

The first use compiles the files with the system's C++ compiler through torch.utils.cpp_extension
(about 30 s on two cores, announced by one stderr line; cached under ~/.cache/torch_extensions, or
TORCH_EXTENSIONS_DIR, and rebuilt when a source changes). Where the CPU lacks AVX512-VNNI (AVX2, for
rows_matmul) or the build fails, `kernels_loaded` (`fp32_kernels_loaded`) and the `*_fits` checks answer
False, with one warning saying why, and the callers use PyTorch's own kernels instead.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import sysconfig
import warnings
from pathlib import Path

import torch

NAME = "plainlm_kernels"
SOURCES = [Path(__file__).parent / name for name in ("int4_matmul.cpp", "int8_matmul.cpp", "decode_attention.cpp")]
HEADERS = [Path(__file__).parent / "vnni_common.h"]
BUILD_NOTICE = "compiling plainlm's CPU kernels, once, ~30 s"
# -fopenmp: at::parallel_for (ATen/ParallelOpenMP.h) runs its loop on one thread without it.
COMPILER_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-fopenmp"]
ROWS_PER_BLOCK = 16  # the matmul kernels compute 16 output rows per register
INT8_INPUT_MULTIPLE = 64  # int8_matmul rounds its activations per 64 inputs
GROUP_MULTIPLE = 16  # int4_matmul and int8_group_matmul read 16 inputs per step, and a group holds whole steps
HEAD_DIM_MULTIPLE = 16  # decode_attention reads a head 16 floats at a time
# rows_matmul.cpp: float32 x @ W^T for a few rows of x, on any CPU with AVX2 and FMA (its own library, so
# that it builds where the AVX512 ones cannot).
FP32_NAME = "plainlm_fp32_kernels"
FP32_SOURCES = [Path(__file__).parent / "rows_matmul.cpp"]
FP32_COMPILER_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]
ROWS_MATMUL_MAX_ROWS = 16  # beyond this many rows, PyTorch's gemm reuses what it packs: use it


def int4_kernel_fits(out_features: int, in_features: int, group_size: int) -> bool:
    """True when torch.ops.plainlm.int4_matmul can run this layer's shape on this CPU."""
    return _groups_fit(out_features, in_features, group_size) and kernels_loaded()


def int8_kernel_fits(out_features: int, in_features: int, group_size: int | None = None) -> bool:
    """True when torch.ops.plainlm.int8_matmul (one scale a row, group_size None) or int8_group_matmul (pairs
    per group of group_size inputs) can run this layer's shape on this CPU."""
    if group_size is None:
        shape_fits = out_features % ROWS_PER_BLOCK == 0 and in_features % INT8_INPUT_MULTIPLE == 0
    else:
        shape_fits = _groups_fit(out_features, in_features, group_size)
    return shape_fits and kernels_loaded()


def _groups_fit(out_features: int, in_features: int, group_size: int) -> bool:
    return out_features % ROWS_PER_BLOCK == 0 and group_size % GROUP_MULTIPLE == 0 and in_features % group_size == 0


def decode_attention_fits(head_dim: int) -> bool:
    """True when torch.ops.plainlm.decode_attention can run heads of this size on this CPU."""
    return head_dim % HEAD_DIM_MULTIPLE == 0 and kernels_loaded()


def decode_attention_takes(cache: torch.Tensor) -> bool:
    """True for a KV cache the decode-attention kernel reads: fp32, in CPU memory. (Cheap and free of
    calls into the build, so a compiled decode step checks it inline.)"""
    return cache.dtype == torch.float32 and cache.device.type == "cpu"


def kernel_input(x: torch.Tensor, in_features: int) -> torch.Tensor:
    """x as plainlm's matmul kernels take it: a contiguous (M, K) matrix of fp32 or bf16."""
    x2 = x.reshape(-1, in_features)
    return x2.contiguous() if x2.dtype in (torch.float32, torch.bfloat16) else x2.float()


@functools.cache
def kernels_loaded() -> bool:
    """Whether the AVX512-VNNI kernels (int4/int8 matmuls, decode attention) run here: built, or loaded from
    the build cache, on first use."""
    if not torch.cpu._is_vnni_supported():  # AVX512-VNNI: Intel from Cascade Lake, AMD from Zen 4
        return False
    if not _build(NAME, SOURCES, HEADERS, COMPILER_FLAGS):
        return False
    torch.library.register_fake("plainlm::int4_matmul")(_int4_matmul_shape)
    torch.library.register_fake("plainlm::int4_matmuls")(_int4_matmuls_shape)
    torch.library.register_fake("plainlm::int8_matmul")(_int8_matmul_shape)
    torch.library.register_fake("plainlm::int8_matmuls")(_int8_matmuls_shape)
    torch.library.register_fake("plainlm::int8_group_matmul")(_int4_matmul_shape)  # the same arguments and shape
    torch.library.register_fake("plainlm::int8_group_matmuls")(_int4_matmuls_shape)
    torch.library.register_fake("plainlm::decode_attention")(_decode_attention_shape)
    torch.library.register_fake("plainlm::paged_attention")(_paged_attention_shape)
    return True


def rows_matmul_takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True for a product x @ weight^T that torch.ops.plainlm_fp32.rows_matmul computes, once
    fp32_kernels_loaded(): float32 on the CPU, a contiguous weight, at most ROWS_MATMUL_MAX_ROWS rows of x
    (where reading the weights is the whole cost). (Cheap and free of calls into the build, so a compiled
    step checks it inline.)"""
    return (
        x.numel() <= ROWS_MATMUL_MAX_ROWS * x.shape[-1]
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and weight.device.type == "cpu"
        and weight.is_contiguous()
    )


@functools.cache
def fp32_kernels_loaded() -> bool:
    """Whether the AVX2 kernel for float32 matmuls of a few rows (rows_matmul.cpp) runs here."""
    if not torch.cpu._is_avx2_supported():
        return False
    if not _build(FP32_NAME, FP32_SOURCES, [], FP32_COMPILER_FLAGS):
        return False
    torch.library.register_fake("plainlm_fp32::rows_matmul")(_rows_matmul_shape)
    return True


def _build(name: str, sources: list[Path], headers: list[Path], flags: list[str]) -> bool:
    """Build (or load from the cache) the library `name`, which registers its operators as it loads; False,
    with one warning saying why, where that fails."""
    if shutil.which("ninja") is None:  # pip's ninja sits beside this Python, which may not be on PATH
        os.environ["PATH"] = f"{sysconfig.get_path('scripts')}{os.pathsep}{os.environ.get('PATH', '')}"
    try:
        # on use: cpp_extension (setuptools, ninja) only to build or load the kernels
        from torch.utils import cpp_extension

        if needs_build(Path(cpp_extension._get_build_directory(name, verbose=False)), name, sources + headers):
            # A first decode would otherwise sit silent for half a minute.
            print(BUILD_NOTICE, file=sys.stderr, flush=True)
        cpp_extension.load(
            name=name,
            sources=[str(path) for path in sources],
            extra_cflags=flags,
            is_python_module=False,  # the library registers its torch.ops as it loads
        )
    except Exception as error:  # no compiler, a failed build: PyTorch's kernels still work
        warnings.warn(
            f"plainlm's CPU kernels ({', '.join(str(p) for p in sources)}) did not build, so decoding uses "
            f"PyTorch's slower kernels. Install a C++ compiler (g++) to get them. The error: {error}",
            stacklevel=3,
        )
        return False
    return True


def needs_build(build_dir: Path, name: str = NAME, files: list[Path] | None = None) -> bool:
    """Whether loading the library `name` compiles it: no library in `build_dir` yet, or one of its `files`
    (default: the VNNI kernels' sources and header) newer than it (as ninja decides there)."""
    library = build_dir / f"{name}.so"
    if not library.exists():
        return True
    built = library.stat().st_mtime
    return any(path.stat().st_mtime > built for path in (SOURCES + HEADERS if files is None else files))


# The outputs' shapes and dtypes, for torch.compile's tracing (fake tensors).
def _int4_matmul_shape(
    x: torch.Tensor, tiles: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    return x.new_empty(x.shape[0], tiles.shape[0] * ROWS_PER_BLOCK)


def _int4_matmuls_shape(
    x: torch.Tensor, tiles: list[torch.Tensor], scales_and_zeros: list[torch.Tensor], group_size: int
) -> torch.Tensor:
    return x.new_empty(x.shape[0], sum(t.shape[0] for t in tiles) * ROWS_PER_BLOCK)


def _int8_matmul_shape(x: torch.Tensor, tiles: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], tiles.shape[0] * ROWS_PER_BLOCK)


def _int8_matmuls_shape(x: torch.Tensor, tiles: list[torch.Tensor], scales: list[torch.Tensor]) -> torch.Tensor:
    return x.new_empty(x.shape[0], sum(t.shape[0] for t in tiles) * ROWS_PER_BLOCK)


def _rows_matmul_shape(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def _decode_attention_shape(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    return torch.empty_like(q)


def _paged_attention_shape(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    return torch.empty_like(q)
