"""Every GPU claim of plainlm, checked in one run: prepared on the CPU, run the moment a GPU is lent.

    python benchmarks/gpu_check.py --out DIR                          # on a GPU: under 8 minutes on one H200
    python benchmarks/gpu_check.py --out DIR --device cpu --tiny      # every section on tiny shapes (make test)
    python benchmarks/gpu_check.py --out DIR --sections training,fsdp # some sections only

Sections (each runs on its own; a failure is reported with its error and the next section runs):
    device       the GPU, PyTorch and CUDA; measured bf16 matmul peak and copy bandwidth beside the datasheet's
    correctness  several families' logits against transformers on the device (fp32, and bf16 with its tolerance);
                 KV-cache decoding against a full forward; LoRA and DoRA forwards against peft
    sdpa         which scaled-dot-product-attention kernel runs (flash, memory-efficient, cuDNN, math) for a
                 training step's shapes and for a decode step's, read off the profiler
    training     `plainlm pretrain` (full) and `plainlm finetune --method lora` of a ~1B Llama-shaped model,
                 bf16-true and bf16-mixed, eager and compiled, as the commands run: tokens/s, MFU against the
                 measured and the datasheet peak, the CUDA peak against `plainlm estimate` for the same run
    fsdp         FSDP2 over NCCL on one process (the code paths of many), activation checkpointing, and a run
                 resumed from its middle checkpoint against the uninterrupted one; LoRA and QLoRA finetunes under
                 FSDP2, loaded on the CPU and moved to the GPU a block at a time
    inference    batch-1 decode tokens/s and bandwidth use, eager, compiled and reduce-overhead (CUDA graphs);
                 NF4 and FP4 (bitsandbytes), int8 and int4 (PyTorch's CUDA kernels) against their float model;
                 the serving engine's throughput at several concurrencies

Nothing is downloaded: random weights of real shapes, the shipped stories, pirate data and 2k tokenizer.
Writes DIR/gpu_check.md (the table, also printed) and DIR/gpu_check.json (raw numbers). Without CUDA and
without `--device cpu`, it says so in one line and exits 0. docs/gpu.md holds the last GPU run's table.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: plainlm from this checkout

from plainlm.checkpoint import save_checkpoint  # noqa: E402
from plainlm.config import Config  # noqa: E402
from plainlm.gpus import spec_for_device_name  # noqa: E402
from plainlm.metrics import measure_peak_flops  # noqa: E402
from plainlm.model import GPT  # noqa: E402
from plainlm.pretrain import init_weights  # noqa: E402

TOKENIZER = REPO / "data" / "tokenizers" / "stories-2k"
STORIES = REPO / "data" / "pretrain"
GiB = 2**30
FP32_TOLERANCE = 1e-4  # fp32 logits on a GPU, TF32 off: reductions run in other orders than transformers'
BF16_TOLERANCE = 3e-2  # bf16 logits against transformers' bf16, relative to the largest fp32 logit
QUANTIZED_TOLERANCE = 2e-2  # int8/int4 kernels (bf16 activations) against their dequantized float model


@dataclass
class Shapes:
    """The sizes a run uses: real ones on a GPU, tiny ones for --tiny (every code path, in seconds)."""

    train_model: dict  # the ~1B Llama shape trained by the training section (vocab: the 2k tokenizer's)
    fsdp_model: dict
    micro_batch: int
    seq_len: int
    steps: int
    warmup: int  # steps left out of the speed figures
    decode_config: str  # a named config for the decode measurements, built with random weights
    decode_overrides: dict
    new_tokens: int
    concurrencies: tuple[int, ...]
    hidden: int  # correctness models' width


def llama_shape(name: str, layers: int, width: int, heads: int, kv_heads: int, mlp: int, context: int) -> dict:
    """Config fields of a Llama-shaped model (tied embeddings; the vocabulary comes from the tokenizer)."""
    return dict(
        name=name, hf_model_type="llama", block_size=context, n_layer=layers, n_embd=width, n_head=heads,
        n_kv_head=kv_heads, intermediate_size=mlp, tie_embeddings=True, rope_theta=500000.0,
    )  # fmt: skip


TINY_MODEL = llama_shape("tiny", 2, 64, 4, 2, 128, 128)
GPU_SHAPES = Shapes(
    train_model=llama_shape("llama-1b-shape", 16, 2048, 32, 8, 8192, 2048),  # 0.97B parameters
    fsdp_model=llama_shape("llama-300m-shape", 8, 1536, 16, 4, 4096, 1024),
    micro_batch=8,
    seq_len=1024,
    steps=12,
    warmup=4,
    decode_config="Llama-3.2-1B",
    decode_overrides={},
    new_tokens=128,
    concurrencies=(1, 8, 32),
    hidden=256,
)
TINY_SHAPES = Shapes(
    train_model=TINY_MODEL,
    fsdp_model=TINY_MODEL,
    micro_batch=2,
    seq_len=64,
    steps=3,
    warmup=1,
    decode_config="Llama-3.2-1B",
    decode_overrides=dict(n_layer=2, n_embd=128, n_head=4, n_kv_head=2, intermediate_size=256, vocab_size=512),
    new_tokens=8,
    concurrencies=(1, 4),
    hidden=64,
)


@dataclass
class Row:
    """One checked claim: what, the measured result in words, whether it holds (None: a measurement only)."""

    check: str
    result: str
    ok: bool | None = None
    raw: dict = field(default_factory=dict)


@dataclass
class Run:
    """What every section shares: the device, the shapes, a scratch folder and what earlier sections measured."""

    device: torch.device
    tiny: bool
    shapes: Shapes
    work: Path
    deadline: float  # time.perf_counter() after which what is left is skipped, so the table is written in time
    match: tuple[str, ...] = ()  # --match: only the checks whose name holds one of these
    measured: dict = field(default_factory=dict)  # peak_flops, bandwidth: for the later sections' ratios

    def out_of_time(self) -> bool:
        return time.perf_counter() > self.deadline

    def wants(self, check: str) -> bool:
        return not self.match or any(text in check for text in self.match)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def attempt(run: Run, check: str, measure: Callable[[], Row]) -> Row:
    """measure(), or a failed row with its error (the section goes on), or a skipped one past the deadline."""
    if not run.wants(check):
        return Row(check, "skipped: not asked for (--match)")
    if run.out_of_time():
        return Row(check, "skipped: the run's time budget was spent")
    try:
        return measure()
    except Exception as error:  # noqa: BLE001 (reported in the table; the next check runs)
        print(traceback.format_exc(), file=sys.stderr)
        return Row(check, f"failed: {type(error).__name__}: {str(error).strip().splitlines()[-1][:300]}", False)


# --- device ---
def section_device(run: Run) -> list[Row]:
    rows = [Row("PyTorch", f"{torch.__version__}, CUDA {torch.version.cuda}")]
    if run.device.type == "cuda":
        name = torch.cuda.get_device_name(run.device)
        free, total = torch.cuda.mem_get_info(run.device)
        rows.append(Row("GPU", f"{name}, {total / GiB:.0f} GiB ({free / GiB:.0f} free)", raw={"name": name}))
    else:
        name = "cpu"
    run.measured["peak_flops"] = measure_peak_flops(run.device, torch.bfloat16, seconds=1.0)
    run.measured["bandwidth"] = copy_bandwidth(run)
    spec = spec_for_device_name(name) if run.device.type == "cuda" else None
    datasheet = f"; datasheet {spec.bf16_flops / 1e12:.0f}" if spec else ""
    rows.append(Row("bf16 matmul peak", f"{run.measured['peak_flops'] / 1e12:.1f} TFLOP/s measured{datasheet}"))
    datasheet = f"; datasheet {spec.memory_bandwidth / 1e12:.2f}" if spec else ""
    rows.append(Row("memory bandwidth (copy)", f"{run.measured['bandwidth'] / 1e12:.2f} TB/s measured{datasheet}"))
    run.measured["datasheet_flops"] = spec.bf16_flops if spec else None
    return rows


def copy_bandwidth(run: Run) -> float:
    """Bytes read and written per second by a device-to-device copy (the best of ten)."""
    n = (2 * GiB if run.device.type == "cuda" and not run.tiny else 64 * 2**20) // 4
    a = torch.empty(n, device=run.device)
    b = torch.empty_like(a)
    b.copy_(a)
    best = float("inf")
    for _ in range(10):
        run.synchronize()
        start = time.perf_counter()
        b.copy_(a)
        run.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * a.numel() * 4 / best


# --- correctness ---
def section_correctness(run: Run) -> list[Row]:
    import transformers

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here
    torch.backends.cudnn.allow_tf32 = False
    h = run.shapes.hidden
    common = dict(
        vocab_size=512,
        hidden_size=h,
        intermediate_size=2 * h,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    families = {
        "llama": transformers.LlamaConfig(**common),
        "qwen3": transformers.Qwen3Config(**common, head_dim=h // 4),
        "gemma3": transformers.Gemma3TextConfig(**common, head_dim=h // 4, sliding_window=16),
        "phi3": transformers.Phi3Config(**common, pad_token_id=0),
    }
    rows = []
    for family, config in families.items():
        directory = run.work / f"hf-{family}"
        random_hf_model(config).save_pretrained(directory)
        rows += family_rows(run, family, directory)
    rows.append(kv_cache_row(run, run.work / "hf-llama"))
    rows += adapter_rows(run, run.work / "hf-qwen3")
    return rows


def random_hf_model(config: object, std: float = 0.2) -> torch.nn.Module:
    """A transformers model with every parameter, norms included, drawn from N(0, std)."""
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model


def hf_model_on(run: Run, directory: Path, dtype: torch.dtype) -> torch.nn.Module:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation="sdpa")
    return model.to(run.device).eval()


def random_ids(run: Run, batch: int = 2, length: int = 48, vocab: int = 512) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1)).to(run.device)


def family_rows(run: Run, family: str, directory: Path) -> list[Row]:
    from plainlm.convert.hf import load_hf_model

    ids = random_ids(run)
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        with torch.no_grad():
            ours = load_hf_model(directory, device=run.device, dtype=dtype).eval()
            logits["ours", dtype] = ours(ids).float()
            del ours
            theirs = hf_model_on(run, directory, dtype)
            logits["theirs", dtype] = theirs(ids).logits.float()
            del theirs
    scale = logits["theirs", torch.float32].abs().max().item()
    fp32 = (logits["ours", torch.float32] - logits["theirs", torch.float32]).abs().max().item()
    bf16 = (logits["ours", torch.bfloat16] - logits["theirs", torch.bfloat16]).abs().max().item() / scale
    # How far each side's bf16 is from fp32: ours should be no further than transformers' own.
    ours_err = (logits["ours", torch.bfloat16] - logits["theirs", torch.float32]).abs().max().item() / scale
    theirs_err = (logits["theirs", torch.bfloat16] - logits["theirs", torch.float32]).abs().max().item() / scale
    return [
        Row(
            f"{family} fp32 logits vs transformers",
            f"max diff {fp32:.1e} (<= {FP32_TOLERANCE:g})",
            fp32 <= FP32_TOLERANCE,
            {"max_abs_diff": fp32},
        ),
        Row(
            f"{family} bf16 logits vs transformers' bf16",
            f"max diff {bf16:.1e} of the largest logit (<= {BF16_TOLERANCE:g}); from fp32: ours {ours_err:.1e}, "
            f"theirs {theirs_err:.1e}",
            bf16 <= BF16_TOLERANCE,
            {"relative_diff": bf16, "ours_from_fp32": ours_err, "theirs_from_fp32": theirs_err},
        ),
    ]


def kv_cache_row(run: Run, directory: Path) -> Row:
    """Prefill 16 tokens into the KV cache, then decode 16 one at a time: each step's logits against the full
    forward pass over the same tokens."""
    from plainlm.convert.hf import load_hf_model

    model = load_hf_model(directory, device=run.device, dtype=torch.float32).eval()
    ids = random_ids(run, batch=1, length=32)
    with torch.no_grad():
        full = model(ids)
        model.set_kv_cache(1, 64)
        steps = [model(ids[:, :16], input_pos=torch.arange(16, device=run.device))[:, -1]]
        for t in range(16, 31):
            steps.append(model(ids[:, t : t + 1], input_pos=torch.tensor([t], device=run.device))[:, -1])
    diff = (torch.stack(steps, 1) - full[:, 15:31]).abs().max().item()
    return Row(
        "KV-cache decode vs full forward (fp32)",
        f"max diff {diff:.1e} (<= {FP32_TOLERANCE:g})",
        diff <= FP32_TOLERANCE,
        {"max_abs_diff": diff},
    )


def adapter_rows(run: Run, directory: Path) -> list[Row]:
    """Our LoRA and DoRA adapters (random A and B) saved in the PEFT layout, loaded by peft: the same logits."""
    import peft

    from plainlm.convert.hf import load_hf_model
    from plainlm.lora import LoRAConfig, inject_lora, save_peft_adapter

    rows = []
    ids = random_ids(run)
    for dora in (False, True):
        ours = load_hf_model(directory, device=run.device, dtype=torch.float32).eval()
        lora = LoRAConfig(r=8, alpha=16, targets=["q", "k", "v", "o", "gate", "up", "down"], dora=dora)
        inject_lora(ours, lora)
        torch.manual_seed(1)
        with torch.no_grad():
            for name, p in ours.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.1)
        adapter = run.work / f"adapter-{dora}"
        save_peft_adapter(ours, lora, adapter)
        theirs = peft.PeftModel.from_pretrained(hf_model_on(run, directory, torch.float32), adapter).eval()
        with torch.no_grad():
            diff = (ours(ids) - theirs(ids).logits).abs().max().item()
        rows.append(
            Row(
                f"{'DoRA' if dora else 'LoRA'} forward vs peft (fp32)",
                f"max diff {diff:.1e} (<= {FP32_TOLERANCE:g})",
                diff <= FP32_TOLERANCE,
                {"max_abs_diff": diff},
            )
        )
    return rows


# --- sdpa ---
SDPA_KERNELS = {  # the profiler's op names -> the backend they are
    "_scaled_dot_product_flash_attention": "flash",
    "_scaled_dot_product_efficient_attention": "memory-efficient",
    "_scaled_dot_product_cudnn_attention": "cuDNN",
    "_scaled_dot_product_attention_math": "math",
    "_scaled_dot_product_fused_attention_overrideable": "fused (overrideable)",
    "plainlm::decode_attention": "plainlm's decode kernel",
}


def section_sdpa(run: Run) -> list[Row]:
    """The attention op each phase dispatches to, in a bf16 model with Llama-3's head size (128)."""
    config = Config(
        name="sdpa",
        n_layer=1,
        n_embd=512,
        n_head=4,
        n_kv_head=2,
        intermediate_size=512,
        vocab_size=512,
        block_size=2048,
    )
    dtype = torch.bfloat16
    model = GPT(config).to(run.device, dtype)
    T = 64 if run.tiny else 1024
    ids = random_ids(run, batch=2, length=T)
    rows = []

    def training_step() -> None:
        model.train()
        model(ids).float().sum().backward()

    def decode_step() -> None:
        model.eval()
        with torch.no_grad():
            model.set_kv_cache(2, T + 1)
            model(ids, input_pos=torch.arange(T, device=run.device))
            model(ids[:, :1], input_pos=torch.tensor([T], device=run.device))

    for phase, step in (
        ("training step (causal, no mask)", training_step),
        ("prefill and decode (KV cache)", decode_step),
    ):
        kernels = attention_kernels(step)
        rows.append(
            Row(f"SDPA backend, {phase}", ", ".join(kernels) or "none seen", bool(kernels), {"kernels": kernels})
        )
    return rows


def attention_kernels(step: Callable[[], None]) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    names = {event.name for event in prof.events()}
    found = []
    for op, backend in SDPA_KERNELS.items():
        if any(op in name for name in names) and backend not in found:
            found.append(backend)
    return found


# --- training ---
@dataclass
class TrainingCase:
    method: str  # "full" (plainlm pretrain) or "lora" (plainlm finetune)
    precision: str
    compiled: bool = False

    @property
    def name(self) -> str:
        return f"{self.method} {self.precision}{' compiled' if self.compiled else ''}"


def training_cases(run: Run) -> list[TrainingCase]:
    cases = [  # the most telling first: a run short of time skips the last
        TrainingCase("full", "bf16-true"),
        TrainingCase("lora", "bf16-true"),
        TrainingCase("lora", "bf16-true", compiled=True),
        TrainingCase("full", "bf16-mixed"),
        TrainingCase("lora", "bf16-mixed"),
        TrainingCase("full", "bf16-true", compiled=True),
    ]
    return cases[:4] if run.tiny else cases  # compiling on a CPU takes long: one compiled case


def section_training(run: Run) -> list[Row]:
    checkpoint = random_checkpoint(run, run.shapes.train_model, "train-checkpoint")
    records = long_records(run.work / "records.jsonl")
    peak = run.measured.get("peak_flops") or measure_peak_flops(run.device, torch.bfloat16)
    return [
        attempt(run, f"train {case.name}", lambda case=case: training_row(run, case, checkpoint, records, peak))
        for case in training_cases(run)
    ]


def training_row(run: Run, case: TrainingCase, checkpoint: Path, records: Path, peak: float) -> Row:
    """One training run as the command runs it: its speed and MFU from metrics.csv, its CUDA peak against the
    estimate for the same arguments; it holds when the loss fell and stayed finite."""
    from plainlm.estimate import estimate_command_result

    out = run.work / f"train-{case.method}-{case.precision}-{case.compiled}"
    args = training_args(run, case, checkpoint, records, out, peak)
    cuda_peak = run_command(run, args)
    metrics = read_metrics(out / "metrics.csv")
    timed = metrics[run.shapes.warmup : -1] or metrics[-1:]  # the last step also validates and saves
    tokens_per_second = statistics.median(float(r["tokens_per_second"]) for r in timed)
    mfu = statistics.median(float(r["mfu"]) for r in timed)
    predicted = estimate_command_result(args[1:]).peak
    result = f"{tokens_per_second:,.0f} tokens/s, MFU {mfu:.0%} of the measured peak"
    datasheet = run.measured.get("datasheet_flops")
    if datasheet:
        result += f" ({mfu * peak / datasheet:.0%} of the datasheet's)"
    losses = [float(r["loss"]) for r in metrics]
    raw = {"tokens_per_second": tokens_per_second, "mfu": mfu, "predicted_peak": predicted, "losses": losses}
    if cuda_peak is not None:
        raw["cuda_peak"] = cuda_peak
        error = (predicted - cuda_peak) / cuda_peak
        result += f"; peak {cuda_peak / GiB:.2f} GiB, estimate {predicted / GiB:.2f} GiB ({error:+.0%})"
    return Row(f"train {case.name}", result, losses[-1] < losses[0] and all(map(finite, losses)), raw)


def finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def random_checkpoint(run: Run, model_fields: dict, name: str) -> Path:
    """A plainlm checkpoint of random weights in bf16 (with the shipped 2k tokenizer), written once per run."""
    directory = run.work / name
    if not (directory / "config.yaml").exists():
        from plainlm.tokenizer import Tokenizer

        vocab = Tokenizer(TOKENIZER).vocab_size
        config = Config(**model_fields, vocab_size=-(-vocab // 64) * 64)  # as pretrain rounds it
        torch.manual_seed(0)
        with torch.device(run.device):
            model = GPT(config)
        init_weights(model)  # as pretraining starts: the default init's logits are far too large
        model.to(torch.bfloat16)
        save_checkpoint(model, directory, tokenizer_dir=TOKENIZER)
        del model
    return directory


def long_records(path: Path, count: int = 64, words: int = 1500) -> Path:
    """Instruction records long enough that every row is cut to the sequence length: full batches."""
    text = (STORIES / "stories-1.txt").read_text().split()
    with path.open("w") as f:
        for i in range(count):
            start = (i * 97) % max(1, len(text) - words)
            f.write(json.dumps({"instruction": "Tell a story.", "output": " ".join(text[start : start + words])}))
            f.write("\n")
    return path


def training_args(run: Run, case: TrainingCase, checkpoint: Path, records: Path, out: Path, peak: float) -> list[str]:
    """The command's arguments, shared by the run and by `plainlm estimate`."""
    s = run.shapes
    common = {
        "device": run.device.type,
        "out_dir": out,
        "overwrite": True,
        "train.precision": case.precision,
        "train.compile": case.compiled,
        "train.micro_batch_size": s.micro_batch,
        "train.global_batch_size": s.micro_batch,
        "train.max_steps": s.steps,
        "train.warmup_steps": 2,
        "train.log_interval": 1,
        "train.eval_interval": s.steps,
        "train.eval_max_batches": 1,
        "train.save_interval": None,
        "train.sample_prompt": None,
        "train.tensorboard": False,
        "train.peak_flops": peak,
    }
    if case.method == "full":  # at the recipe's tiny-model rate, a 1B model's loss jumps in its first steps
        options = {**pretrain_options(run, s.train_model), "optimizer.init_args.lr": 3e-4, **common}
        return ["pretrain", *flags(options)]
    recipe = REPO / "recipes" / "finetune" / "smollm2-135m-instruct" / "lora.yaml"
    data = {"path": records, "val_path": records, "prompt_style": "alpaca", "max_seq_length": s.seq_len}
    finetune = {"config": recipe, "checkpoint_dir": checkpoint, **{f"data.{k}": v for k, v in data.items()}}
    return ["finetune", *flags({**finetune, "data.mask_prompt": False, **common})]


def pretrain_options(run: Run, model: dict) -> dict:
    """`plainlm pretrain` of `model` (Config fields) on the shipped stories, tokenized once per run."""
    return {
        "config": REPO / "recipes" / "pretrain" / "tiny-stories.yaml",
        "model_config": json.dumps(model, separators=(",", ":")),
        "data.seq_length": run.shapes.seq_len,
        "data.shards_dir": run.work / "shards",
        "data.workers": 1,
    }


def flags(options: dict[str, object]) -> list[str]:
    """{"train.max_steps": 12, "resume": None} -> ["--train.max_steps", "12", "--resume", "null"]."""
    words = []
    for key, value in options.items():
        text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        words += [f"--{key}", text]
    return words


# A child running `python -m plainlm.cli ...` that prints the CUDA allocator's peak as it exits.
CHILD = """
import atexit, runpy, sys, torch
def report():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        print("CUDA_PEAK", torch.cuda.max_memory_allocated(), file=sys.stderr)
atexit.register(report)
sys.argv = ["plainlm", *sys.argv[1:]]
runpy.run_module("plainlm.cli", run_name="__main__")
"""


def run_command(run: Run, args: list[str]) -> int | None:
    """Run `plainlm ARGS` in a child process; its CUDA peak allocated bytes (None on the CPU), or an error.
    It may overrun the run's deadline by two minutes (a compile), not more."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    timeout = max(60.0, run.deadline + 120 - time.perf_counter())
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(f"plainlm {' '.join(args[:1])} failed:\n{done.stderr[-2500:]}")
    peaks = [int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("CUDA_PEAK")]
    return peaks[-1] if peaks else None


def read_metrics(path: Path) -> list[dict]:
    with path.open() as f:
        return [row for row in csv.DictReader(f) if row["tokens_per_second"]]


# --- fsdp ---
def section_fsdp(run: Run) -> list[Row]:
    """FSDP2 on one process (NCCL on a GPU), activation checkpointing on; then the same run resumed from its
    step-4 checkpoint in another folder: its losses for the later steps against the uninterrupted run's."""
    s = run.shapes
    steps, middle = 8, 4
    options = {
        **pretrain_options(run, s.fsdp_model),
        "device": run.device.type,
        "strategy": "fsdp",
        "train.activation_checkpointing": True,
        "train.precision": "bf16-mixed",
        "train.micro_batch_size": s.micro_batch,
        "train.global_batch_size": 2 * s.micro_batch,
        "train.max_steps": steps,
        "train.log_interval": 1,
        "train.eval_interval": steps,
        "train.eval_max_batches": 1,
        "train.save_interval": middle,
        "train.keep_checkpoints": 3,
        "train.sample_prompt": None,
        "train.tensorboard": False,
        "train.peak_flops": 1e12,
    }
    whole, resumed = run.work / "fsdp-whole", run.work / "fsdp-resumed"
    run_command(run, ["pretrain", *flags({**options, "out_dir": whole, "overwrite": True})])
    run_command(run, ["pretrain", *flags({**options, "out_dir": resumed, "resume": whole / f"step-{middle:06d}"})])
    first = {int(r["step"]): float(r["loss"]) for r in read_metrics(whole / "metrics.csv")}
    second = {int(r["step"]): float(r["loss"]) for r in read_metrics(resumed / "metrics.csv")}
    later = [step for step in range(middle + 1, steps + 1) if step in first]
    diffs = [abs(first[step] - second.get(step, float("nan"))) for step in later]
    exact = all(d == 0 for d in diffs)
    worst = max(diffs) if diffs else float("nan")
    finetunes = [
        attempt(run, f"finetune {method} under FSDP2", lambda m=method: fsdp_finetune_row(run, m))
        for method in ("lora", "qlora")
    ]
    return [
        Row(
            "FSDP2 + activation checkpointing, one process",
            f"{steps} steps, loss {first[1]:.3f} -> {first[steps]:.3f}",
            first[steps] < first[1],
            {"losses": list(first.values())},
        ),
        Row(
            f"resume from step {middle}: losses of steps {middle + 1}-{steps}",
            "bitwise equal" if exact else f"max diff {worst:.1e} (<= 1e-3)",
            bool(diffs) and worst <= 1e-3,
            {"whole": first, "resumed": second},
        ),
        *finetunes,
    ]


def fsdp_finetune_row(run: Run, method: str) -> Row:
    """`plainlm finetune --strategy fsdp` (on a GPU the model loads on the CPU and each block moves to the GPU as
    it is sharded; qlora quantizes each layer on the GPU): the loss falls; the CUDA peak against the estimate."""
    from plainlm.estimate import estimate_command_result

    s = run.shapes
    checkpoint = random_checkpoint(run, s.fsdp_model, "fsdp-checkpoint")
    records = long_records(run.work / "records.jsonl")
    case = TrainingCase(method, "bf16-mixed")
    args = training_args(run, case, checkpoint, records, run.work / f"fsdp-{method}", 1e12)
    args += flags({"method": method, "strategy": "fsdp", "train.activation_checkpointing": True})
    if method == "qlora" and run.device.type != "cuda":
        args += flags({"quantize": "int4"})  # bitsandbytes' nf4 under FSDP is the GPU's case; int4 on the CPU
    cuda_peak = run_command(run, args)
    losses = [float(r["loss"]) for r in read_metrics(run.work / f"fsdp-{method}" / "metrics.csv")]
    result = f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    raw = {"losses": losses}
    if cuda_peak is not None:
        predicted = estimate_command_result(args[1:]).peak
        raw.update(cuda_peak=cuda_peak, predicted_peak=predicted)
        result += f"; peak {cuda_peak / GiB:.2f} GiB, estimate {predicted / GiB:.2f} GiB"
    return Row(f"finetune {method} under FSDP2", result, losses[-1] < losses[0] and all(map(finite, losses)), raw)


# --- inference ---
def section_inference(run: Run) -> list[Row]:
    from plainlm.named_configs import config_for_name

    s = run.shapes
    config = dataclasses.replace(config_for_name(s.decode_config), **s.decode_overrides)
    torch.manual_seed(0)
    with torch.device(run.device):
        model = GPT(config).to(torch.bfloat16).eval()
    model.requires_grad_(False)
    prompt = torch.randint(0, config.vocab_size, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = []
    eager: list[int] = []  # the eager run's tokens, which the compiled runs are compared with
    for mode in [False, True] if run.tiny else [False, True, "reduce-overhead"]:
        check = f"decode bf16 batch 1, {compile_name(mode)}"
        rows.append(attempt(run, check, lambda m=mode, c=check: bf16_decode_row(run, model, prompt, m, c, eager)))
    float32 = copy.deepcopy(model).float()
    for mode in ("nf4", "fp4", "int8", "int4"):
        if mode in ("nf4", "fp4") and run.device.type != "cuda":
            continue  # bitsandbytes' CPU path is checked by the tests; here it is the GPU's
        rows.append(
            attempt(run, f"decode {mode} batch 1", lambda m=mode: quantized_row(run, model, float32, m, prompt))
        )
    return rows + engine_rows(run)


def bf16_decode_row(run: Run, model: GPT, prompt: list[int], mode: bool | str, check: str, eager: list[int]) -> Row:
    tokens_per_second, tokens = decode_speed(run, model, prompt, compile=mode)
    eager[:] = eager or tokens
    # A random model's near-flat logits let bf16's rounding (fused or not) flip argmaxes: said, not judged.
    same = sum(a == b for a, b in zip(tokens, eager, strict=True)) / len(tokens)
    read = model_bytes(model) + kv_bytes(model.config, len(prompt) + run.shapes.new_tokens)
    use = tokens_per_second * read / (run.measured.get("bandwidth") or copy_bandwidth(run))
    result = f"{tokens_per_second:,.0f} tokens/s, {use:.0%} of the measured bandwidth; {same:.0%} of tokens as eager"
    return Row(check, result, None, {"tokens_per_second": tokens_per_second, "bandwidth_use": use, "same": same})


def quantized_row(run: Run, model: GPT, float32: GPT, mode: str, prompt: list[int]) -> Row:
    """A quantized copy of `model`: its decode speed (eager; compiled too for int8/int4) and its logits against
    its float model's."""
    from plainlm.quantize import quantize_model

    quantized = quantize_model(copy.deepcopy(model), mode)
    tokens_per_second, _ = decode_speed(run, quantized, prompt, compile=False)
    diff = quantized_logit_error(run, quantized, float32, prompt)
    raw = {"tokens_per_second": tokens_per_second, "error": diff}
    speeds = f"{tokens_per_second:,.0f} tokens/s eager"
    if mode in ("int8", "int4") and not run.out_of_time():
        raw["compiled_tokens_per_second"], _ = decode_speed(run, quantized, prompt, compile=True)
        speeds += f", {raw['compiled_tokens_per_second']:,.0f} compiled"
    result = f"{speeds}; logits {diff:.1e} of the largest from its float model (<= {QUANTIZED_TOLERANCE:g})"
    return Row(f"decode {mode} batch 1", result, diff <= QUANTIZED_TOLERANCE, raw)


def compile_name(mode: bool | str) -> str:
    return {False: "eager", True: "compiled"}.get(mode, str(mode))


def decode_speed(run: Run, model: GPT, prompt: list[int], compile: bool | str) -> tuple[float, list[int]]:
    """Greedy tokens/s of batch-1 decoding after a warm-up call (which compiles), and the tokens."""
    from plainlm.generate import generate_tokens

    def decode() -> tuple[float, list[int]]:
        tokens, stamps = [], []
        for step in generate_tokens(model, [prompt], max_new_tokens=run.shapes.new_tokens, compile=compile):
            run.synchronize()
            stamps.append(time.perf_counter())
            tokens.append(step[0])
        return (len(stamps) - 1) / (stamps[-1] - stamps[0]), tokens

    decode()
    return decode()


def quantized_logit_error(run: Run, quantized: GPT, float32: GPT, prompt: list[int]) -> float:
    """The quantized model's logits against a float32 model holding its dequantized weights, relative to the
    largest: what its kernels add to the rounding it chose."""
    from plainlm.lora import base_weight
    from plainlm.quantize import dequantize_model

    if quantized.quantization["mode"] in ("int8", "int4"):
        reference = dequantize_model(copy.deepcopy(quantized), torch.float32)
    else:  # bitsandbytes' Linear4bit layers in the float32 model
        reference = copy.deepcopy(float32)
        for name, module in quantized.named_modules():
            if getattr(getattr(module, "weight", None), "quant_state", None) is not None:
                reference.get_submodule(name).weight.data = base_weight(module).float()
    ids = torch.tensor([prompt], device=run.device)
    with torch.no_grad():
        expected = reference(ids).float()
        got = quantized(ids).float()
    return ((got - expected).abs().max() / expected.abs().max()).item()


def model_bytes(model: GPT) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def kv_bytes(config: Config, tokens: int) -> int:
    return 2 * config.n_layer * config.n_kv_head * config.head_dim * tokens * 2  # bf16


def engine_rows(run: Run) -> list[Row]:
    """The serving engine over the training section's ~1B checkpoint: output tokens/s for N requests at once."""
    from plainlm.api import LLM
    from plainlm.sampling import SamplingParams
    from plainlm.serve.engine import Engine, Request

    checks = {n: f"serve engine, {n} at once" for n in run.shapes.concurrencies}
    if not any(map(run.wants, checks.values())):
        return []
    checkpoint = random_checkpoint(run, run.shapes.train_model, "train-checkpoint")
    llm = LLM.load(checkpoint, device=str(run.device), dtype=torch.bfloat16)
    length = min(512, llm.model.config.block_size)

    def throughput(concurrency: int) -> Row:
        engine = Engine(llm, max_batch_size=max(run.shapes.concurrencies), max_seq_length=length)
        params = SamplingParams(max_new_tokens=run.shapes.new_tokens, temperature=0.0)
        requests = [
            Request(
                prompt=torch.randint(0, llm.tokenizer.vocab_size, (64,), generator=seeded(i)).tolist(), params=params
            )
            for i in range(concurrency)
        ]
        engine.generate(requests[:1])  # warm-up
        start = time.perf_counter()
        results = engine.generate(requests)
        seconds = time.perf_counter() - start
        tokens = sum(len(r.token_ids) for r in results)
        raw = {"tokens_per_second": tokens / seconds, "tokens": tokens}
        return Row(f"serve engine, {concurrency} at once", f"{tokens / seconds:,.0f} output tokens/s", tokens > 0, raw)

    return [attempt(run, check, lambda n=n: throughput(n)) for n, check in checks.items()]


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- the run ---
SECTIONS: dict[str, Callable[[Run], list[Row]]] = {  # in the order they run: the quick ones first
    "device": section_device,
    "correctness": section_correctness,
    "sdpa": section_sdpa,
    "fsdp": section_fsdp,
    "inference": section_inference,
    "training": section_training,
}


def markdown(results: list[dict], header: str) -> str:
    lines = [header, "", "| section | check | result | holds |", "|---|---|---|---|"]
    for section in results:
        if section["status"] == "failed":
            error = section["error"].strip().splitlines()[-1].replace("|", "/")[:300]
            lines.append(f"| {section['name']} | - | **failed** after {section['seconds']:.0f} s: {error} | no |")
            continue
        for row in section["rows"]:
            holds = {True: "yes", False: "**no**", None: ""}[row["ok"]]
            lines.append(f"| {section['name']} | {row['check']} | {row['result']} | {holds} |")
        lines.append(f"| {section['name']} | (time) | {section['seconds']:.0f} s | |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where gpu_check.md and gpu_check.json go")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: every code path in seconds")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--budget", type=float, default=420, help="seconds; checks left after it are skipped")
    parser.add_argument("--match", default="", help="comma-separated: only the training and decode checks so named")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (--device cpu --tiny runs the CPU version)")
        return 0
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    header = f"plainlm gpu_check on {name}, {time.strftime('%Y-%m-%d')}, torch {torch.__version__}"
    header += " (tiny shapes)" if args.tiny else ""
    results = []
    with tempfile.TemporaryDirectory(prefix="plainlm-gpu-check-") as work:
        shapes = TINY_SHAPES if args.tiny else GPU_SHAPES
        deadline = time.perf_counter() + args.budget
        run = Run(device, args.tiny, shapes, Path(work), deadline, tuple(filter(None, args.match.split(","))))
        for section in args.sections.split(","):
            results.append(run_section(run, section))
            write_report(args.out, header, results)  # after each section: a run cut short still leaves its table
    print(markdown(results, header))
    return 0


def run_section(run: Run, name: str) -> dict:
    start = time.perf_counter()
    try:
        rows = SECTIONS[name](run)
        result = {"name": name, "status": "ok", "rows": [vars(r) for r in rows]}
    except Exception:  # noqa: BLE001 (a failed section is reported; the next one runs)
        result = {"name": name, "status": "failed", "error": traceback.format_exc(), "rows": []}
        print(result["error"], file=sys.stderr)
    result["seconds"] = time.perf_counter() - start
    print(f"gpu_check: {name} {result['status']} in {result['seconds']:.0f} s", file=sys.stderr, flush=True)
    if run.device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def write_report(out: Path, header: str, results: list[dict]) -> None:
    (out / "gpu_check.md").write_text(markdown(results, header) + "\n")
    (out / "gpu_check.json").write_text(json.dumps({"header": header, "sections": results}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
