"""What a training run reports: FLOPs and MFU, metrics.csv, TensorBoard events and the loss plot.

MFU (model FLOPs utilisation) is the training FLOPs the model needs per second divided by the
device's peak for the precision its matmuls run in: a CPU with AMX runs bf16 matmuls 5-12x faster
than fp32 ones, so a bf16 run measured against the fp32 peak would claim several times the real
utilisation. The peak is measured with a matmul in that dtype at the start of a run, or given
(`peak_flops`, e.g. a GPU's datasheet figure).
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import torch

from plainlm.config import Config


def flops_per_token(config: Config, n_params: int, seq_len: int, trainable_fraction: float = 1.0) -> float:
    """Training FLOPs per token: forward 2N + attention, backward twice the forward for the
    weights that train and once (activation gradients only) for frozen ones (PaLM appendix B style).
    N counts the weights a token passes through: a mixture of experts' unchosen experts do not count."""
    attention = 2 * config.n_layer * config.n_head * config.head_dim * seq_len  # scores and values, forward
    forward = 2 * (n_params - unchosen_expert_params(config)) + attention
    backward = 2 * forward * trainable_fraction + forward * (1 - trainable_fraction)
    return forward + backward


def unchosen_expert_params(config: Config) -> int:
    """The expert weights a token skips: n_expert - n_expert_per_token of the experts of every MoE layer."""
    if not config.n_expert:
        return 0
    size = config.moe_intermediate_size or config.intermediate_size
    per_expert = 3 * config.n_embd * size + (2 * size + config.n_embd if config.moe_expert_bias else 0)
    moe_layers = sum(config.is_moe(i) for i in range(config.n_layer))
    return moe_layers * (config.n_expert - config.n_expert_per_token) * per_expert


def matmul_dtype(precision: str) -> torch.dtype:
    """The dtype a training precision runs its matmuls in (autocast's for the mixed ones)."""
    return torch.bfloat16 if precision.startswith("bf16") else torch.float32


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, seconds: float = 0.5) -> float:
    """The best matmul FLOP/s this device reaches for `dtype`, measured for about `seconds`.

    Pass the dtype the run's matmuls use (`matmul_dtype(precision)`): the peaks differ by up to 12x.
    """
    n = 1024 if device.type == "cpu" else 8192
    # Filled without the global RNG, which a resumed run has just restored.
    a = torch.ones(n, n, device=device, dtype=dtype)
    b = torch.ones(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    best, deadline = math.inf, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


class MetricsLogger:
    """Appends one row per logged step to metrics.csv and writes the same scalars to TensorBoard."""

    FIELDS = ("step", "tokens", "loss", "lr", "tokens_per_second", "mfu", "val_loss", "val_ppl", "seconds")

    def __init__(self, out_dir: Path, resume: bool, tensorboard: bool = True, extra: tuple[str, ...] = ()) -> None:
        """extra: the objective's own columns (a preference loss's rewards and accuracy), after FIELDS."""
        self.path = out_dir / "metrics.csv"
        self.fields = (*self.FIELDS, *extra)
        new = not (resume and self.path.exists())
        self.file = self.path.open("w" if new else "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=self.fields)
        if new:
            self.writer.writeheader()
        self.board = None
        if tensorboard:
            # on use: slow to import, and only for this output
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(out_dir / "tensorboard"))

    def log(self, step: int, **values: float | None) -> None:
        self.writer.writerow({"step": step, **{k: ("" if v is None else v) for k, v in values.items()}})
        self.file.flush()
        if self.board is not None:
            for key, value in values.items():
                if value is not None and key != "seconds":
                    self.board.add_scalar(key, value, step)

    def truncate_after(self, step: int) -> None:
        """Drop rows past `step`: a resumed run rewrites the steps after its checkpoint."""
        self.file.close()
        with self.path.open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields)
            writer.writeheader()
            writer.writerows(rows)
        self.file = self.path.open("a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=self.fields)

    def close(self) -> None:
        self.file.close()
        if self.board is not None:
            self.board.close()


def plot_loss(metrics_csv: Path, out_png: Path) -> Path:
    """Training loss (and validation loss where measured) against step, as a PNG."""
    # on use: slow to import, and only for this output
    import matplotlib

    matplotlib.use("Agg")
    # on use: slow to import, and only for this output
    import matplotlib.pyplot as plt

    with metrics_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    train = [(int(r["step"]), float(r["loss"])) for r in rows if r["loss"]]
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="training loss", linewidth=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png
