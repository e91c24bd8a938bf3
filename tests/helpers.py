"""What tests share: the repository's path, `plainlm` run as a user runs it, one tiny-model factory
(ours, and a transformers one), greedy decoding by full forward passes, one resumable toy loader, LoRA
adapters made and merged, and `plainlm serve` in a process of its own.
Fixtures live in conftest.py; this is plain code, imported as `from helpers import ...` (pyproject.toml
puts tests/ on the path)."""

from __future__ import annotations

import copy
import itertools
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import openai
import torch
import transformers

from plainlm.config import Config
from plainlm.data import IGNORE_INDEX
from plainlm.kernels import fp32_kernels_loaded, kernels_loaded
from plainlm.lora import LoRAConfig, inject_lora, load_peft_adapter, lora_state, merge_lora, save_peft_adapter
from plainlm.model import GPT
from plainlm.sampling import SamplingParams, distribution

REPO = Path(__file__).resolve().parents[1]

# Two layers, grouped-query attention, a 64-token vocabulary: trains in milliseconds a step.
TINY = dict(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, intermediate_size=64, vocab_size=64, block_size=32)


def run_cli(
    *args: str, stdin: str | None = None, timeout: float = 120, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`plainlm ARGS` in a fresh process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "plainlm.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def tiny_gpt(config: Config | None = None, seed: int = 0, std: float | None = None, **fields: object) -> GPT:
    """A seeded GPT of `config` (default: TINY with `fields` changed), in training mode.

    std: draw every parameter, norm weights included, from N(0, std) instead of the usual init: logits
    then are peaked (greedy tokens do not near-tie, so comparing two decoders is not a coin toss) and a
    wrong cache slot, position or norm cannot hide.
    """
    torch.manual_seed(seed)
    model = GPT(config if config is not None else Config(**{**TINY, **fields}))
    if std is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, std)
    return model


def reference_greedy(model: GPT, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding without a cache: the whole sequence through the model at every step."""
    seq = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([seq]))
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt) :]


def joint_distribution(model, prompt: list[int], params: SamplingParams, n: int) -> torch.Tensor:
    """P(t1..tn) under `model` and `params`, exactly, by a cacheless pass for every prefix."""
    V = model.config.vocab_size
    joint = torch.ones([V] * n, dtype=torch.float64)
    with torch.no_grad():
        for prefix in itertools.chain.from_iterable(itertools.product(range(V), repeat=i) for i in range(n)):
            logits = model(torch.tensor([prompt + list(prefix)]))[0, -1:]
            p = distribution(logits, params)[0].double()
            joint[prefix] *= p.reshape([V] + [1] * (n - len(prefix) - 1))
    return joint


def chi_square_p_value(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's test, the cells expected fewer than 5 times pooled into one."""
    rare = expected < 5
    observed = torch.cat([observed[~rare], observed[rare].sum(0, keepdim=True)])
    expected = torch.cat([expected[~rare], expected[rare].sum(0, keepdim=True)])
    statistic = float(((observed - expected) ** 2 / expected.clamp(min=1e-12)).sum())
    dof = len(expected) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2), torch.tensor(statistic / 2)))


def greedy_margins(model, prompt: list[int], output: list[int]) -> list[float]:
    """How far each token of `output` led the runner-up, by one cacheless pass over the whole sequence."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output]))[0, len(prompt) - 1 : -1]
    top2 = logits.topk(2, dim=-1).values
    return (top2[:, 0] - top2[:, 1]).tolist()


def randomise_adapters(model: torch.nn.Module, seed: int = 1) -> None:
    """Draw every LoRA A and B of `model` from N(0, 0.1) and shift DoRA magnitudes likewise: B is zero at
    initialisation, which would hide a wrong mapping."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora_state(model).items():
            noise = torch.randn(p.shape, generator=g) * 0.1
            p.copy_(p + noise if name.endswith("magnitude") else noise)


def make_adapter(base: GPT, directory: Path, lora: LoRAConfig, seed: int) -> Path:
    """An adapter with random nonzero A, B (and magnitude) for `base`, saved in the PEFT layout."""
    model = inject_lora(copy.deepcopy(base), lora)
    randomise_adapters(model, seed)
    return save_peft_adapter(model, lora, directory)


def merged(base: torch.nn.Module, adapter: Path) -> torch.nn.Module:
    """A copy of `base` with the adapter at `adapter` merged into its weights."""
    model = copy.deepcopy(base)
    load_peft_adapter(model, adapter)
    return merge_lora(model)


def tiny_hf_model(
    config: transformers.PretrainedConfig, seed: int = 0, std: float = 0.3
) -> transformers.PreTrainedModel:
    """A seeded transformers model of `config` with every parameter, norms included, drawn from N(0, std)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model


def make_tiny_hf_model(directory: Path, vocab_size: int, seed: int = 0) -> transformers.PreTrainedModel:
    """A two-layer transformers Llama with random weights, saved to `directory`."""
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    model = tiny_hf_model(config, seed)
    model.save_pretrained(directory)
    return model


class ToyLoader:
    """Seeded batches that follow plainlm/data's contract, with a resumable position (state_dict).

    Batch i depends only on i, so a resumed run sees exactly the batches an uninterrupted one would.
    counting=False: random tokens, with uneven target counts across micro-batches (row 0's first
    i % 5 targets ignored), to check the loss normalisation. counting=True: rows that count up
    (mod vocab_size) from a seeded random start, a rule a tiny model learns in a few steps.
    """

    def __init__(self, batch_size: int = 2, length: int = 16, vocab_size: int = 64, counting: bool = False) -> None:
        self.batch_size, self.length, self.vocab_size, self.counting = batch_size, length, vocab_size, counting
        self.position = 0

    def __iter__(self) -> ToyLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = self._batch(self.position)
        self.position += 1
        return batch

    def _batch(self, i: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(i)
        if self.counting:
            start = torch.randint(0, self.vocab_size, (self.batch_size, 1), generator=generator)
            rows = (start + torch.arange(self.length + 1)) % self.vocab_size
            return {"input_ids": rows[:, :-1], "targets": rows[:, 1:].clone()}
        x = torch.randint(0, self.vocab_size, (self.batch_size, self.length + 1), generator=generator)
        targets = x[:, 1:].clone()
        targets[0, : i % 5] = IGNORE_INDEX
        return {"input_ids": x[:, :-1], "targets": targets}

    def val_batches(self):  # noqa: ANN201
        yield self._batch(10_000)

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = state["position"]


# --- plainlm serve in a process of its own (tests/test_serve_*.py) ---
@dataclass
class ServerProcess:
    process: subprocess.Popen
    url: str
    stdout: list[str]  # the lines printed up to the address line
    stderr_file: IO[str]  # a file, not a pipe: a pipe nobody reads would block the server once full

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60)

    def stderr(self) -> str:
        self.stderr_file.seek(0)
        return self.stderr_file.read()


@contextmanager
def plainlm_serve(model: Path, *options: str, start_timeout: float = 120) -> Iterator[ServerProcess]:
    """`plainlm serve MODEL --port 0 OPTIONS` in a fresh process, once it has printed its address.

    plainlm's CPU kernels are built here first (once per machine, a minute or more), not in the server: its
    start then fits the wait, and a server killed mid-build would leave torch's build lock behind, on which
    every later build waits forever."""
    kernels_loaded(), fp32_kernels_loaded()
    with tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "plainlm.cli", "serve", str(model), "--port", "0", *options],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            cwd=REPO,
            # Ctrl-C as a terminal gives it: a suite started in the background (`make test &`) would pass on the
            # ignored SIGINT that shells give background jobs, and a SIGINT would then end nothing.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        lines: queue.Queue[str | None] = queue.Queue()

        def read_lines() -> None:  # in a thread, so that waiting for the address line can time out
            for line in process.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=read_lines, daemon=True).start()
        server = ServerProcess(process, "", [], stderr)
        try:
            deadline = time.monotonic() + start_timeout
            while " at http://" not in (server.stdout or [""])[-1]:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
                if line is None:
                    raise AssertionError(f"plainlm serve exited ({process.wait()}) early:\n{server.stderr()}")
                server.stdout.append(line.rstrip("\n"))
            server.url = server.stdout[-1].split(" at ")[1].split()[0]
            yield server
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)
