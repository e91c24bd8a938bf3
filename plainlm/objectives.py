"""What a training step minimises: the token loss of pretraining and supervised finetuning, or a preference
objective (DPO, IPO, hinge, SimPO, ORPO: the formulas are in losses.py) over paired batches.

The loop (train.py) asks an objective for two things, so that it never needs to know which one runs:

    counts(batch) -> {unit: n}          what the step's loss is averaged over: target tokens; preference pairs
                                        (and for ORPO also the chosen rows' tokens). The loop sums them over the
                                        step's micro-batches and every rank before the first backward.
    parts(model, batch) -> (sums, stats)  the micro-batch's loss as sums per unit ({"tokens": summed cross-
                                        entropy}), so that sums[unit] / step total[unit] added up over micro-
                                        batches and ranks is exactly the loss of one big batch; and sums of
                                        what to log per pair (rewards, margins, accuracy).

The reference model of DPO, IPO and hinge is never a second copy of the weights: with LoRA, DoRA or QLoRA it
is the same model with its adapters switched off (lora.adapters_disabled); in full finetuning its log-
probabilities are computed once before training (`reference_table`), kept in out_dir, and handed to the loss in
each batch as `reference_logps` by `WithReference`.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from plainlm.data import IGNORE_INDEX
from plainlm.data.preference import collate_pairs, completion_targets
from plainlm.errors import CheckpointError, InvalidInput
from plainlm.host_memory import release_free_memory
from plainlm.lora import LoRAExperts, LoRALinear, adapters_disabled
from plainlm.losses import dpo_loss, hinge_loss, ipo_loss, needs_reference, orpo_loss, sequence_logps, simpo_loss

Loss = Literal["sft", "dpo", "ipo", "hinge", "simpo", "orpo"]


def token_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed cross-entropy over the batch's target tokens (IGNORE_INDEX positions excluded)."""
    logits = model(
        batch["input_ids"], position_ids=batch.get("position_ids"), attention_mask=batch.get("attention_mask")
    )
    return F.cross_entropy(
        logits.flatten(0, 1).float(), batch["targets"].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


class TokenLoss:
    """Next-token cross-entropy, averaged over the step's target tokens: pretraining and SFT."""

    unit = "tokens"
    stats: tuple[str, ...] = ()
    perplexity = True  # exp(loss) means something
    sequences_per_example = 1

    def __init__(self, compile: bool = False) -> None:
        # Compiled together, the head's logits and the cross-entropy fuse: the (tokens x vocab) fp32 logits are
        # not written out and read back again for the softmax.
        self.loss_sum = torch.compile(token_loss_sum) if compile else token_loss_sum

    def counts(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        return {"tokens": int((batch["targets"] != IGNORE_INDEX).sum())}

    def parts(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        return {"tokens": self.loss_sum(model, batch)}, {}


@dataclass
class PreferenceArgs:
    """The preference objective's constants: the `preference:` section of a finetune recipe (with loss: dpo ...).

    Args:
        beta: dpo, ipo, hinge: how far the policy may move from the reference (trl's beta; ipo's tau); simpo: the
            reward scale; orpo: the weight of the odds-ratio term (the paper's lambda).
        label_smoothing: dpo: the probability that a preference label is flipped (conservative DPO), in [0, 0.5).
        gamma: simpo: the target reward margin.
    """

    beta: float = 0.1
    label_smoothing: float = 0.0
    gamma: float = 0.5


class PreferenceObjective:
    """A preference loss over batches of pairs (data/preference.py's collate_pairs: a row a pair).

    Per pair, the sequence log-probability is the sum of its completion tokens' log-probabilities (SimPO and
    ORPO: their mean). The reference's come from the batch (`reference_logps`, full finetuning) or from the
    same forward machinery with the adapters off (LoRA, DoRA, QLoRA)."""

    unit = "pairs"
    stats = ("rewards_chosen", "rewards_rejected", "margins", "accuracy")
    perplexity = False
    sequences_per_example = 2  # chosen and rejected: what the memory plan counts

    def __init__(self, loss: Loss, args: PreferenceArgs) -> None:
        self.loss, self.args = loss, args
        self.needs_reference = needs_reference(loss)
        # Every argument checked now, not at the first step: the same checks the loss functions make.
        probe = torch.zeros(1)
        self._objective(probe, probe, probe, probe, probe, probe, torch.zeros(()))

    def counts(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        counts = {"pairs": int((batch["pair_ids"] >= 0).sum())}
        if self.loss == "orpo":
            chosen, _ = completion_targets(batch)
            counts["chosen_tokens"] = int(whole_chosen_targets(batch, chosen).ne(IGNORE_INDEX).sum())
        return counts

    def parts(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        # On a CPU, the last micro-batch's backward and this one's forward passes free tensors of other sizes than
        # the next pass allocates: their pages go back to the system now, or the heap grows past the live peak.
        on_cpu = batch["input_ids"].device.type == "cpu"
        if on_cpu:
            release_free_memory()
        P = len(batch["pair_ids"])
        real = (batch["pair_ids"] >= 0).float()  # a padding pair (a rank out of validation data) counts nothing
        reference = None
        if self.needs_reference:
            reference = batch.get("reference_logps")
            if reference is None:
                reference = adapters_off_logps(model, batch)
        logps, tokens, whole = pair_logps(model, batch, whole_chosen=self.loss == "orpo")
        if reference is None:
            reference = torch.zeros_like(logps)
        # A padding pair scores nothing (0 of 0 tokens): give it a harmless log-probability, so that no objective
        # meets log(1 - exp(0)) = -inf on it (ORPO) and its zero weight cannot meet a NaN.
        logps = torch.where(torch.cat([real, real]) > 0, logps, -1.0)
        result = self._objective(
            logps[:P], logps[P:], reference[:P], reference[P:], tokens[:P].float(), tokens[P:].float(), torch.zeros(())
        )
        sums = {"pairs": torch.where(real > 0, result.losses, 0.0).sum()}
        if whole is not None:  # trl's ORPO: NLL over the chosen sequences' every token, prompt included
            sums["chosen_tokens"] = -whole.sum()
        chosen, rejected = result.chosen_rewards * real, result.rejected_rewards * real
        stats = {
            "rewards_chosen": chosen.sum(),
            "rewards_rejected": rejected.sum(),
            "margins": (chosen - rejected).sum(),
            "accuracy": ((result.chosen_rewards > result.rejected_rewards).float() * real).sum(),
        }
        if on_cpu:
            release_free_memory()
        return sums, stats

    def _objective(self, chosen, rejected, reference_chosen, reference_rejected, chosen_tokens, rejected_tokens, nll):
        a = self.args
        if self.loss == "dpo":
            return dpo_loss(chosen, rejected, reference_chosen, reference_rejected, a.beta, a.label_smoothing)
        if self.loss == "ipo":
            return ipo_loss(
                chosen, rejected, reference_chosen, reference_rejected, chosen_tokens, rejected_tokens, a.beta
            )
        if self.loss == "hinge":
            return hinge_loss(chosen, rejected, reference_chosen, reference_rejected, a.beta)
        chosen_avg, rejected_avg = chosen / chosen_tokens.clamp(min=1), rejected / rejected_tokens.clamp(min=1)
        if self.loss == "simpo":
            return simpo_loss(chosen_avg, rejected_avg, a.beta, a.gamma, a.label_smoothing)
        # orpo: its NLL is averaged over the step's chosen tokens, not per pair, so it is a part of its own (nll 0)
        return orpo_loss(chosen_avg, rejected_avg, nll, a.beta)


def pair_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], whole_chosen: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One forward pass over a batch of pairs (data/preference.py's collate_pairs): the summed log-probabilities
    of the completions and their token counts, (2P,) each, the P chosen first; with `whole_chosen`, also each
    chosen sequence's whole log-probability (P,), prompt included (ORPO's NLL). Logits are computed only where
    something is scored."""
    chosen, rejected = completion_targets(batch)
    scored_chosen = whole_chosen_targets(batch, chosen) if whole_chosen else chosen
    chosen_positions, chosen_targets = scored_positions(scored_chosen, chosen)
    rejected_positions, rejected_targets = scored_positions(rejected, rejected)
    logits = model(
        batch["input_ids"],
        position_ids=batch["position_ids"],
        attention_mask=batch["attention_mask"],
        logit_positions=torch.cat([chosen_positions, rejected_positions], dim=1),
    )
    K = chosen_positions.shape[1]
    chosen_logps, chosen_tokens = sequence_logps(logits[:, :K], chosen_targets)
    rejected_logps, rejected_tokens = sequence_logps(logits[:, K:], rejected_targets)
    whole = None
    if whole_chosen:
        whole, _ = sequence_logps(logits[:, :K], scored_positions(scored_chosen, scored_chosen)[1])
    return torch.cat([chosen_logps, rejected_logps]), torch.cat([chosen_tokens, rejected_tokens]), whole


def whole_chosen_targets(batch: dict[str, torch.Tensor], chosen: torch.Tensor) -> torch.Tensor:
    """(P, T): the chosen branch's targets (`chosen`, from completion_targets) and, before them, each prompt
    column's next token: ORPO's NLL reads the whole chosen sequence. The prompt's columns are those before the
    rejected branch without a target."""
    inputs = batch["input_ids"]
    columns = torch.arange(inputs.shape[1], device=inputs.device)
    prompt = (columns < batch["rejected_from"][:, None]) & (chosen == IGNORE_INDEX)
    following = torch.cat([inputs[:, 1:], inputs[:, -1:]], dim=1)
    return torch.where(prompt, following, chosen)


def scored_positions(scored: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions (B, K) where `scored` has a target, each row's padded by repeating its last, and `targets`
    at those positions (IGNORE_INDEX on the padding): the model computes logits only there. A pair's completion
    is often much shorter than its prompt, and the (rows, positions, vocabulary) logits are most of a preference
    step's memory."""
    T = scored.shape[1]
    valid = scored != IGNORE_INDEX
    K = max(int(valid.sum(dim=1).max()), 1)
    # Valid positions first, in order: sort by (not valid, position).
    order = torch.argsort(torch.where(valid, 0, T) + torch.arange(T, device=scored.device), dim=1)[:, :K]
    kept = valid.gather(1, order)
    last = order.gather(1, (kept.sum(dim=1, keepdim=True) - 1).clamp(min=0))
    positions = torch.where(kept, order, last)
    return positions, torch.where(kept, targets.gather(1, positions), IGNORE_INDEX)


@torch.no_grad()
def adapters_off_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reference's sequence log-probabilities: the same model with its LoRA / DoRA adapters switched off."""
    if not any(isinstance(m, (LoRALinear, LoRAExperts)) for m in model.modules()):
        raise InvalidInput(
            "this preference loss needs a reference model, and the model has no adapters to switch off: full "
            "finetuning takes its reference log-probabilities from a table computed before training (reference_table)"
        )
    with adapters_disabled(model):
        return pair_logps(model, batch)[0]


# --- full finetuning: the reference's log-probabilities, computed once ---
def reference_fingerprint(model_identity: dict[str, Any], splits: dict[str, list]) -> str:
    """What a reference table was computed from: the model's identity and every pair's token ids."""
    digest = hashlib.sha256(repr(sorted(model_identity.items())).encode())
    for name, pairs in splits.items():
        digest.update(name.encode())
        for pair in pairs:
            for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
                digest.update(ids.numpy().astype("int64").tobytes() + b"|")
    return digest.hexdigest()


@torch.no_grad()
def reference_table(
    model: torch.nn.Module,
    splits: dict[str, list],
    batch_size: int,
    pad_id: int,
    path: Path,
    fingerprint: str,
    write: bool,
    autocast: Any = None,
) -> dict[str, torch.Tensor]:
    """{split: (pairs, 2) float32}: the starting model's summed completion log-probabilities (chosen, rejected)
    of every pair, by pair index. Read from `path` when it holds this fingerprint; refused when it holds another
    (a reference computed for another model or dataset must not score this run); else computed in one pass and,
    when `write`, saved atomically beside the run's checkpoints, so a resumed run reuses it. `autocast`: the
    training's own (bf16-mixed), so that the policy starts exactly at its reference."""
    if path.exists():
        with safe_open(str(path), "pt") as f:
            found = (f.metadata() or {}).get("fingerprint")
            if found == fingerprint:
                return {name: f.get_tensor(name) for name in splits}
        raise CheckpointError(
            f"{path} holds reference log-probabilities of another model or dataset: this run's pairs or model "
            "changed since it was computed. Resume with the same model and data, or start afresh (--overwrite true)"
        )
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tables = {}
    for name, pairs in splits.items():
        rows = []
        for start in range(0, len(pairs), batch_size):
            batch = {k: v.to(device) for k, v in collate_pairs(pairs[start : start + batch_size], pad_id).items()}
            with autocast or contextlib.nullcontext():
                logps, _, _ = pair_logps(model, batch)
            P = len(batch["pair_ids"])
            rows.append(torch.stack([logps[:P], logps[P:]], dim=1).float().cpu())
        tables[name] = torch.cat(rows) if rows else torch.zeros(0, 2)
    model.train(was_training)
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        save_file(tables, str(partial), metadata={"fingerprint": fingerprint})
        partial.replace(path)
    return tables


class WithReference:
    """A preference loader whose batches also carry `reference_logps` (2P,): each pair's chosen and rejected
    reference log-probabilities from `tables`, rows in the batch's order (a padding pair gets zeros)."""

    def __init__(self, loader: Any, tables: dict[str, torch.Tensor]) -> None:
        self.loader, self.tables = loader, tables

    def _with_reference(self, batch: dict[str, torch.Tensor], split: str) -> dict[str, torch.Tensor]:
        ids = batch["pair_ids"]
        found = self.tables[split][ids.clamp(min=0)] * (ids >= 0)[:, None]
        return {**batch, "reference_logps": torch.cat([found[:, 0], found[:, 1]])}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return (self._with_reference(batch, "train") for batch in self.loader)

    def val_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        return (self._with_reference(batch, "val") for batch in self.loader.val_batches())

    def state_dict(self) -> dict[str, int]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.loader.load_state_dict(state)
