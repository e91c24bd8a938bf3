"""Optimizers for tests/test_distributed.py that fail on one rank only, named in a recipe by class_path."""

from __future__ import annotations

import os
import signal

import torch


class FailingAdamW(torch.optim.AdamW):
    """AdamW that raises in its third step on rank 1: a failure that only one process sees."""

    def step(self, closure=None):  # noqa: ANN001, ANN201 (torch's signature)
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 3 and os.environ.get("RANK") == "1":
            raise RuntimeError("injected failure on rank 1 in step 3")
        return super().step(closure)


class DyingAdamW(torch.optim.AdamW):
    """AdamW whose process is killed (SIGKILL: no exception, no cleanup) in its third step on rank 1."""

    def step(self, closure=None):  # noqa: ANN001, ANN201 (torch's signature)
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 3 and os.environ.get("RANK") == "1":
            os.kill(os.getpid(), signal.SIGKILL)
        return super().step(closure)


def print_nf4_shard_shapes(model_dir: str) -> None:
    """Under torchrun: QLoRA's NF4 base weight of one layer, before and after FSDP shards it (rank 0 prints)."""
    from plainlm import distributed
    from plainlm.api import LLM
    from plainlm.finetune import prepare_model
    from plainlm.lora import LoRAConfig

    with distributed.joined("fsdp", "cpu") as world:
        llm = LLM.load(model_dir, device="cpu")
        prepare_model(llm, "qlora", LoRAConfig(r=4), "nf4")
        before = llm.model.blocks[0].attn.q_proj.base.weight
        shape = tuple(before.shape)
        distributed.shard(llm.model, "32-true", world.device)
        after = llm.model.blocks[0].attn.q_proj.base.weight
        if world.is_main:
            print(f"{type(before).__name__} {shape} -> {type(after).__name__} local {tuple(after.to_local().shape)}")


if __name__ == "__main__":
    import sys

    print_nf4_shard_shapes(sys.argv[1])
