"""Training on several processes: launching them, joining their process group, wrapping the model.

    plainlm finetune --config R.yaml --devices 2 --strategy fsdp           # plainlm starts 2 workers itself
    torchrun --nproc_per_node 2 -m plainlm finetune --config R.yaml ...    # or joins the group torchrun made

Training is data parallel: each rank reads its own share of every step's sequences (the loaders take
rank and world_size). `ddp` keeps a whole replica on every rank and all-reduces the gradients; `fsdp`
(PyTorch's FSDP2, `fully_shard`) keeps 1/world_size of every weight, gradient and optimizer state on
each rank and gathers a block's weights only for its forward and backward. How the loop uses this is in
train.py; sharded training checkpoints are in train_state.py.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import socket
import tempfile
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from plainlm.device import move_to, resolve_device
from plainlm.errors import InvalidInput, PlainlmError, WorkerFailed

Strategy = Literal["auto", "ddp", "fsdp"]  # what a user asks for
Wrapping = Literal["none", "ddp", "fsdp"]  # what a run does: auto resolved (none on one process, else ddp)
# A collective that waits longer than this ends the run with an error instead of hanging forever (a rank that
# died without its launcher noticing). Generous, because rank 0 alone tokenizes a pretraining corpus while
# the others wait at a barrier.
TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes. The default is one process, without a group."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    strategy: Wrapping = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def grouped(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over every rank, in place (and returned)."""
        if self.grouped:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_true(self, flag: bool) -> bool:
        """Whether `flag` holds on every rank: how ranks agree to give up together."""
        if not self.grouped:
            return flag
        t = torch.tensor(int(flag), device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t)

    def barrier(self) -> None:
        if self.grouped:
            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)


# --- joining ---
def inside_launcher() -> bool:
    """Whether torchrun (or `launch`) started this process: it then joins their group."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_strategy(strategy: Strategy, world_size: int) -> Wrapping:
    """auto: nothing to wrap on one process, ddp on several; ddp and fsdp as asked."""
    if strategy == "auto":
        return "ddp" if world_size > 1 else "none"
    return strategy


def check_process_counts(devices: int, num_nodes: int) -> None:
    """--devices and --num_nodes count processes and machines: at least one of each."""
    for flag, value in (("--devices", devices), ("--num_nodes", num_nodes)):
        if value < 1:
            raise InvalidInput(f"{flag} {value}: must be 1 or more (--devices: processes per machine, one per GPU)")


def must_launch(devices: int, num_nodes: int) -> bool:
    return (devices > 1 or num_nodes > 1) and not inside_launcher()


@contextlib.contextmanager
def joined(strategy: Strategy, device: str | None) -> Iterator[World]:
    """Join the process group the environment describes (or make a one-process group for an explicit
    ddp/fsdp on one process); leave it on exit."""
    size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    chosen = resolve_strategy(strategy, size)
    target = resolve_device(device)
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", local_rank)  # one GPU per process on a node
    if target.type == "cuda":
        torch.cuda.set_device(target)
    created = chosen != "none" and not dist.is_initialized()
    if created:
        backend = "nccl" if target.type == "cuda" else "gloo"
        _init_process_group(backend, rank, size, target)
    try:
        yield World(rank, local_rank, size, target, chosen)
    finally:
        if created:
            dist.destroy_process_group()


def _init_process_group(backend: str, rank: int, size: int, device: torch.device) -> None:
    device_id = device if device.type == "cuda" else None
    if "MASTER_ADDR" not in os.environ:  # one process and no launcher: there is no one to meet
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=TIMEOUT, device_id=device_id
        )
        return
    address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" or not _is_loopback(address):
        dist.init_process_group(backend, init_method="env://", timeout=TIMEOUT, device_id=device_id)
        return
    # A local run: rank 0 serves the group's store on the loopback address only. A TCPStore that binds its own
    # socket listens on every interface, so it gets a socket bound here instead.
    listen_fd = socket.create_server((address, port)).detach() if rank == 0 else None
    store = dist.TCPStore(address, port, size, rank == 0, timeout=TIMEOUT, master_listen_fd=listen_fd)
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=TIMEOUT, device_id=device_id)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


# --- launching ---
def launch(command: Callable[..., Any], kwargs: dict[str, Any], devices: int, num_nodes: int, endpoint: str | None):
    """Run `command(**kwargs)` in devices x num_nodes processes through torch's elastic launcher; returns rank 0's
    result. A failure on any rank ends every rank and raises WorkerFailed with that rank's message."""
    # on use: torch.distributed's launcher/FSDP modules load only for several processes
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if num_nodes > 1 and endpoint is None:
        raise InvalidInput(
            f"num_nodes {num_nodes} needs rdzv_endpoint: HOST:PORT of one node that every node can reach, "
            "the same on every node (e.g. --rdzv_endpoint node0:29400)"
        )
    threads = max(1, (os.cpu_count() or 1) // devices)  # processes x threads should not exceed the cores
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
    with tempfile.TemporaryDirectory(prefix="plainlm-rendezvous-") as tmp:
        if endpoint is None:
            # One node: the workers meet through a file, and rank 0 serves the process group's store on 127.0.0.1
            # only (`_init_process_group`); left to itself, the launcher would serve a store on every interface.
            options = dict(rdzv_endpoint=str(Path(tmp) / "store"), rdzv_configs={"store_type": "file"})
            options["local_addr"] = "127.0.0.1"
            env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
            loopback = [name for _, name in socket.if_nameindex() if name in ("lo", "lo0")]
            for variable in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):  # their connections too
                if loopback and variable not in os.environ:
                    env[variable] = loopback[0]
        else:
            check_endpoint_free(endpoint)
            options = dict(rdzv_endpoint=endpoint)
        config = LaunchConfig(
            min_nodes=num_nodes,
            max_nodes=num_nodes,
            nproc_per_node=devices,
            rdzv_backend="c10d",
            run_id="plainlm",
            max_restarts=0,  # a failed rank ends the run: restarting would repeat the same error
            monitor_interval=0.1,
            start_method="spawn",
            **options,
        )
        with _environment(env), _quiet_launcher():
            try:
                results = elastic_launch(config, _run_worker)(command, kwargs)
            except ChildFailedError as e:
                rank, failure = e.get_first_failure()
                message = failure.message  # from the rank's error file: {"message": "Type: text", ...}
                message = message.get("message", message) if isinstance(message, dict) else message
                raise WorkerFailed(f"rank {rank} of {devices * num_nodes} failed: {message}") from None
    return results[min(results)]


def _run_worker(command: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    """One worker process (started by `launch`): the launcher records its error for the parent to report."""

    try:
        return command(**kwargs)
    except PlainlmError:
        raise  # bad input, said in one line by the parent
    except Exception:
        traceback.print_exc()  # a bug: show where, as a single process would
        raise


def check_endpoint_free(endpoint: str) -> None:
    """A clear error when the rendezvous port is taken on this machine (else the launcher would wait on it)."""
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise InvalidInput(f"rdzv_endpoint {endpoint!r} is not HOST:PORT (e.g. localhost:29400)")
    try:
        with socket.create_server((host.strip("[]"), int(port))):
            pass
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise InvalidInput(
                f"rdzv_endpoint {endpoint}: port {port} is already in use on this machine; "
                "pick a free port, or leave rdzv_endpoint out on a single node"
            ) from None
        # another node's address (EADDRNOTAVAIL) or a name this node cannot bind: that node hosts the rendezvous


@contextlib.contextmanager
def _quiet_launcher() -> Iterator[None]:
    """The launcher logs a failed rank's traceback again, and each process it stops: the rank itself has said
    what went wrong, and `launch` says which rank it was."""
    loggers = [logging.getLogger(name) for name in ("torch.distributed.elastic", "torch.multiprocessing")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --- the model ---
def wrap(model: nn.Module, world: World, precision: str) -> nn.Module:
    """The model as `world` trains it: itself, inside DDP, or sharded in place with FSDP2."""
    if world.strategy == "ddp":
        return DistributedDataParallel(
            model,
            device_ids=[world.device.index] if world.device.type == "cuda" else None,
            forward_sync_buffers=False,  # the only buffers are RoPE tables and frozen quantized weights: never changed
        )
    if world.strategy == "fsdp":
        shard(model, precision, world.device)
    return model


def shard(model: nn.Module, precision: str, device: torch.device) -> None:
    """FSDP2 on each block, the embedding and the head, then the root (which holds what is left).

    Each part moves to `device` just before it is sharded: a model that waits on the CPU (finetune loads it there
    for FSDP on GPUs) never stands whole on a GPU, which holds its shards and one whole block at a time.

    bf16-mixed is FSDP's MixedPrecisionPolicy: weights are gathered in bf16, gradients reduced in fp32.
    A tied head uses the embedding's weight: both stay in the root group, whose weights are gathered for the
    whole forward, so the head never finds its weight sharded. QLoRA's frozen base shards too: int8/int4 keep
    their weights in buffers, which FSDP does not shard (each rank holds the whole quantized base), and NF4
    weights are bitsandbytes Params4bit, sharded as plain bytes: bitsandbytes' Linear4bit restores their
    quant_state from the module when a gathered weight arrives without it.
    """
    # on use: torch.distributed's launcher/FSDP modules load only for several processes
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    options = dict(mp_policy=policy) if precision == "bf16-mixed" else {}
    for block in model.blocks:
        fully_shard(move_to(block, device), **options)
    if not model.config.tie_embeddings:
        for module in (model.embed, model.lm_head):
            if any(True for _ in module.parameters()):  # an int8/int4 embedding has buffers only
                fully_shard(move_to(module, device), **options)
    fully_shard(move_to(model, device), **options)


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself (DDP's inner module): what evaluation, sampling and checkpoints read."""
    return model.module if isinstance(model, DistributedDataParallel) else model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Reduce gradients over ranks only in the backward of a step's last micro-batch."""
    # on use: torch.distributed's launcher/FSDP modules load only for several processes
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
        yield
    elif isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
    else:
        yield


def clip_grad_norm_(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_, with the norm of sharded gradients (FSDP DTensors) taken over all their shards."""
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights, whole and on the CPU, in rank 0 (other ranks get {}). Every rank must call it:
    under FSDP it gathers the shards."""
    # on use: torch.distributed's launcher/FSDP modules load only for several processes
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state = get_model_state_dict(model, options=options)
    # Buffers come too, and a frozen int8/int4 base (qlora --quantize int4) holds its integers in buffers.
    # remove_duplicate=False: a tied head's weight is the embedding's, and the state names it under both.
    trainable = {name for name, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    return {name: tensor for name, tensor in state.items() if name in trainable}
