"""plainlm/losses.py against trl 1.16.0's own code.

Each objective's per-pair losses and rewards, from random log-probabilities, against the trl method that
computes them; sequence_logps against F.cross_entropy; and the whole path (a tiny transformers Llama's
logits -> sequence_logps -> objective) against trl's own forward and loss on the same batch and model.

trl's trainers are not constructed (that needs a dataset, a tokenizer and a Trainer): its methods run on a
small stand-in that holds only the attributes the method reads, set as the trainer's __init__ sets them.
Where a method runs a model, the stand-in model is either a real tiny transformers model or one that returns
fixed per-token log-probabilities (so that trl's loss code is what runs, on numbers the test chose).

Tolerance: 1e-6 absolute on float32 for the objectives (same inputs, same formula); 1e-5 for the end-to-end
comparisons, where trl's fused LM head computes the log-probabilities in its own tiles.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import transformers
from helpers import tiny_hf_model

from plainlm.errors import InvalidInput
from plainlm.losses import (
    PREFERENCE_LOSSES,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    needs_reference,
    orpo_loss,
    sequence_logps,
    simpo_loss,
)

pytest.importorskip("trl")
from helpers_trl import RecordingAccelerator, TrlDPO  # noqa: E402
from trl.experimental.cpo.cpo_trainer import CPOTrainer  # noqa: E402
from trl.experimental.orpo.orpo_trainer import ORPOTrainer  # noqa: E402
from trl.trainer.dpo_trainer import DataCollatorForPreference  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

EXACT = dict(rtol=0, atol=1e-6)  # float32, same formula on the same inputs
END_TO_END = dict(rtol=0, atol=1e-5)  # trl's fused, tiled LM head against full logits


class FixedLogps:
    """A model patched with trl's add_fused_lm_head, reduced to its answer: the given per-token log-probs."""

    training = False

    def __init__(self, log_probs: torch.Tensor) -> None:
        self.log_probs = log_probs

    def __call__(self, labels: torch.Tensor, fused_lm_head: bool, **kwargs) -> SimpleNamespace:
        zeros = torch.zeros_like(self.log_probs)
        return SimpleNamespace(log_probs=self.log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


class TrlCPO:
    """CPOTrainer's loss methods on the attributes CPOTrainer.__init__ sets (alpha=0: no AlphaPO)."""

    cpo_loss = CPOTrainer.cpo_loss
    concatenated_forward = CPOTrainer.concatenated_forward
    get_batch_loss_metrics = CPOTrainer.get_batch_loss_metrics
    concatenated_inputs = staticmethod(CPOTrainer.concatenated_inputs)
    get_batch_logps = staticmethod(CPOTrainer.get_batch_logps)

    def __init__(self, loss_type: str, beta: float, label_smoothing: float = 0.0, simpo_gamma: float = 0.5) -> None:
        self.loss_type, self.beta, self.label_smoothing, self.simpo_gamma = (
            loss_type,
            beta,
            label_smoothing,
            simpo_gamma,
        )
        self.alpha, self.cpo_alpha = 0.0, 0.0
        self.is_encoder_decoder, self.pad_token_id, self.aux_loss_enabled = False, 0, False
        self.accelerator = RecordingAccelerator()


class TrlORPO:
    """ORPOTrainer's loss methods on the attributes ORPOTrainer.__init__ sets."""

    odds_ratio_loss = ORPOTrainer.odds_ratio_loss
    concatenated_forward = ORPOTrainer.concatenated_forward
    get_batch_loss_metrics = ORPOTrainer.get_batch_loss_metrics
    concatenated_inputs = staticmethod(ORPOTrainer.concatenated_inputs)
    get_batch_logps = staticmethod(ORPOTrainer.get_batch_logps)

    def __init__(self, beta: float) -> None:
        self.beta = beta
        self.is_encoder_decoder, self.padding_value, self.aux_loss_enabled = False, 0, False
        self.accelerator = RecordingAccelerator()


def random_pairs(pairs: int = 6, length: int = 14, seed: int = 0) -> tuple[dict, torch.Tensor]:
    """A DPOTrainer batch (chosen rows, then rejected rows) of prompts and completions of random lengths, random
    reference log-probabilities, and the policy's random per-token log-probabilities (zero off the completion)."""
    g = torch.Generator().manual_seed(seed)
    rows = 2 * pairs
    prompt = torch.randint(1, 5, (rows,), generator=g)
    completion = torch.randint(1, length - 5, (rows,), generator=g)
    position = torch.arange(length)
    completion_mask = ((position >= prompt[:, None]) & (position < (prompt + completion)[:, None])).long()
    per_token = -torch.rand(rows, length - 1, generator=g) * 6 * completion_mask[:, 1:]
    inputs = {
        "input_ids": torch.zeros(rows, length, dtype=torch.long),
        "attention_mask": (position < (prompt + completion)[:, None]).long(),
        "completion_mask": completion_mask,
        "ref_chosen_logps": -torch.rand(pairs, generator=g) * 40,
        "ref_rejected_logps": -torch.rand(pairs, generator=g) * 40,
    }
    return inputs, per_token


def pair(inputs: dict, per_token: torch.Tensor, i: int) -> tuple[dict, torch.Tensor]:
    """Pair i alone, as a batch of one."""
    pairs = len(inputs["ref_chosen_logps"])
    rows = [i, pairs + i]
    one = {k: v[rows] if k.endswith("mask") or k == "input_ids" else v[i : i + 1] for k, v in inputs.items()}
    return one, per_token[rows]


@pytest.mark.parametrize("name", ["dpo", "ipo", "hinge"])
def test_reference_objectives_match_trl_dpo_trainer(name: str) -> None:
    beta = 0.1 if name != "ipo" else 0.3
    inputs, per_token = random_pairs()
    summed = per_token.sum(dim=1)
    counts = inputs["completion_mask"].sum(dim=1)
    pairs = len(inputs["ref_chosen_logps"])
    logps = (summed[:pairs], summed[pairs:], inputs["ref_chosen_logps"], inputs["ref_rejected_logps"])
    if name == "dpo":
        ours = dpo_loss(*logps, beta=beta)
    elif name == "ipo":
        ours = ipo_loss(*logps, counts[:pairs], counts[pairs:], beta=beta)
    else:
        ours = hinge_loss(*logps, beta=beta)
    loss_type = {"dpo": "sigmoid", "ipo": "ipo", "hinge": "hinge"}[name]

    trl_loss, chosen_rewards, rejected_rewards, chosen_logps, _ = TrlDPO(FixedLogps(per_token), loss_type, beta).loss(
        inputs
    )
    torch.testing.assert_close(chosen_logps, summed[:pairs], rtol=0, atol=0)  # the capture is the one meant
    torch.testing.assert_close(ours.losses.mean(), trl_loss, **EXACT)
    torch.testing.assert_close(ours.chosen_rewards, chosen_rewards, **EXACT)
    torch.testing.assert_close(ours.rejected_rewards, rejected_rewards, **EXACT)
    per_pair = [
        TrlDPO(FixedLogps(t), loss_type, beta).loss(one)[0]
        for one, t in (pair(inputs, per_token, i) for i in range(pairs))
    ]
    torch.testing.assert_close(ours.losses, torch.stack(per_pair), **EXACT)
    assert not ours.chosen_rewards.requires_grad
    if name == "hinge":  # both sides of the hinge are exercised
        assert (ours.losses == 0).any() and (ours.losses > 0).any()


def test_dpo_label_smoothing_is_conservative_dpo_as_trl_applies_it() -> None:
    beta, smoothing = 0.1, 0.2
    g = torch.Generator().manual_seed(1)
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = -torch.rand(4, 8, generator=g) * 40
    ours = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, label_smoothing=smoothing)
    # trl 1.16 applies (1-ε)·-logσ(βΔ) + ε·-logσ(-βΔ) in CPOTrainer.cpo_loss ("sigmoid") to the difference of
    # what it is given: given the log-ratios, that difference is DPO's Δ and its rewards are DPO's.
    losses, chosen_rewards, rejected_rewards = TrlCPO("sigmoid", beta, smoothing).cpo_loss(
        policy_chosen - ref_chosen, policy_rejected - ref_rejected
    )
    torch.testing.assert_close(ours.losses, losses, **EXACT)
    torch.testing.assert_close(ours.chosen_rewards, chosen_rewards, **EXACT)
    torch.testing.assert_close(ours.rejected_rewards, rejected_rewards, **EXACT)
    unsmoothed = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    assert (ours.losses - unsmoothed.losses).abs().min() > 1e-3

    # trl 1.16's DPOTrainer ignores label_smoothing for "sigmoid": were that to change, so would the reference above.
    inputs, per_token = random_pairs(seed=2)
    summed = per_token.sum(dim=1)
    smoothed_trl = TrlDPO(FixedLogps(per_token), "sigmoid", beta, label_smoothing=smoothing).loss(inputs)[0]
    plain = dpo_loss(*summed.chunk(2), inputs["ref_chosen_logps"], inputs["ref_rejected_logps"], beta)
    torch.testing.assert_close(plain.losses.mean(), smoothed_trl, **EXACT)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_simpo_matches_trl_cpo_trainer(smoothing: float) -> None:
    beta, gamma = 2.0, 0.8
    g = torch.Generator().manual_seed(3)
    chosen_avg, rejected_avg = -torch.rand(2, 8, generator=g) * 3
    ours = simpo_loss(chosen_avg, rejected_avg, beta, gamma, label_smoothing=smoothing)
    losses, chosen_rewards, rejected_rewards = TrlCPO("simpo", beta, smoothing, simpo_gamma=gamma).cpo_loss(
        chosen_avg, rejected_avg
    )
    torch.testing.assert_close(ours.losses, losses, **EXACT)
    torch.testing.assert_close(ours.chosen_rewards, chosen_rewards, **EXACT)
    torch.testing.assert_close(ours.rejected_rewards, rejected_rewards, **EXACT)
    # gamma is a margin in reward units: it moves the loss as much as β·Δ does
    shifted = simpo_loss(chosen_avg + 0.1, rejected_avg, beta, gamma + beta * 0.1, label_smoothing=smoothing)
    torch.testing.assert_close(shifted.losses, ours.losses, **EXACT)


def test_orpo_matches_trl_orpo_trainer() -> None:
    beta = 0.25
    g = torch.Generator().manual_seed(4)
    # per-token averages on both sides of -log 2, where trl's log1mexp switches formula
    chosen_avg, rejected_avg = -torch.rand(2, 8, generator=g) * 3 - 0.01
    assert (chosen_avg > -0.69).any() and (chosen_avg < -0.7).any()
    nll = torch.tensor(1.7)
    ours = orpo_loss(chosen_avg, rejected_avg, nll, beta)

    trl = TrlORPO(beta)
    _, chosen_rewards, rejected_rewards, _, _ = trl.odds_ratio_loss(chosen_avg, rejected_avg)
    torch.testing.assert_close(ours.chosen_rewards, chosen_rewards, **EXACT)
    torch.testing.assert_close(ours.rejected_rewards, rejected_rewards, **EXACT)

    def trl_total(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        # get_batch_loss_metrics's forward, reduced to its answer: these log-probs and this NLL
        empty = torch.zeros(len(chosen), 1, 1)
        trl.concatenated_forward = lambda model, batch: (chosen, rejected, empty, empty, nll)
        return trl.get_batch_loss_metrics(None, {})[0]

    torch.testing.assert_close(ours.losses.mean(), trl_total(chosen_avg, rejected_avg), **EXACT)
    per_pair = [trl_total(chosen_avg[i : i + 1], rejected_avg[i : i + 1]) for i in range(8)]
    torch.testing.assert_close(ours.losses, torch.stack(per_pair), **EXACT)


def test_sequence_logps_matches_cross_entropy() -> None:
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 9, 13, generator=g) * 3
    targets = torch.randint(0, 13, (4, 9), generator=g)
    targets[1, :3] = -100  # a prompt
    targets[2, 4:] = -100  # padding
    targets[3] = -100  # nothing to count
    logits.requires_grad_(True)
    summed, counts = sequence_logps(logits, targets)
    expected = -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").sum(dim=1)
    torch.testing.assert_close(summed, expected, rtol=0, atol=1e-5)
    assert counts.tolist() == [9, 6, 4, 0] and summed[3] == 0

    # the gradient the training loop will take through it
    (grad,) = torch.autograd.grad(summed.sum(), logits)
    (expected_grad,) = torch.autograd.grad(expected.sum(), logits)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-6)


def test_sequence_logps_of_bf16_logits_is_float32_exact() -> None:
    g = torch.Generator().manual_seed(6)
    logits = (torch.randn(3, 7, 11, generator=g) * 4).bfloat16()
    targets = torch.randint(0, 11, (3, 7), generator=g)
    targets[0, :2] = -100
    summed, counts = sequence_logps(logits, targets)
    assert summed.dtype == torch.float32
    expected = -F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none").sum(dim=1)
    torch.testing.assert_close(summed, expected, rtol=0, atol=1e-5)
    bf16_softmax = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    assert (summed - (bf16_softmax * (targets != -100)).sum(1).float()).abs().max() > 1e-3  # not bf16 math


def tiny_llama(seed: int) -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return tiny_hf_model(config, seed=seed, std=0.1)


def collated_pairs(pairs: int = 4, seed: int = 7) -> dict:
    """trl's own DataCollatorForPreference over random prompts, chosen and rejected completions."""
    g = torch.Generator().manual_seed(seed)

    def ids(low: int, high: int) -> list[int]:
        return torch.randint(1, 64, (int(torch.randint(low, high, (), generator=g)),), generator=g).tolist()

    examples = [{"prompt_ids": ids(2, 6), "chosen_ids": ids(1, 8), "rejected_ids": ids(1, 8)} for _ in range(pairs)]
    return DataCollatorForPreference(pad_token_id=0)(examples)


def our_logps(model, batch: dict, mask: str = "completion_mask") -> tuple[torch.Tensor, torch.Tensor]:
    """plainlm's path: the model's logits, shifted against the targets that `mask` keeps, to sequence_logps."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["input_ids"][:, 1:].masked_fill(batch[mask][:, 1:] == 0, -100)
    return sequence_logps(logits[:, :-1], targets)


@pytest.mark.parametrize("name", ["dpo", "ipo", "hinge"])
def test_end_to_end_against_trl_dpo_trainer_on_a_tiny_llama(name: str) -> None:
    beta = 0.1
    policy, reference = tiny_llama(seed=0), tiny_llama(seed=1)
    batch = collated_pairs()
    pairs = len(batch["input_ids"]) // 2
    with torch.no_grad():
        policy_logps, counts = our_logps(policy, batch)
        reference_logps, _ = our_logps(reference, batch)
    logps = (policy_logps[:pairs], policy_logps[pairs:], reference_logps[:pairs], reference_logps[pairs:])
    if name == "dpo":
        ours = dpo_loss(*logps, beta=beta)
    elif name == "ipo":
        ours = ipo_loss(*logps, counts[:pairs], counts[pairs:], beta=beta)
    else:
        ours = hinge_loss(*logps, beta=beta)

    # as DPOTrainer.__init__ patches them
    add_fused_lm_head(policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    add_fused_lm_head(reference)
    trl = TrlDPO(policy, {"dpo": "sigmoid"}.get(name, name), beta, ref_model=reference)
    with torch.no_grad():
        loss, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps = trl.loss(batch)
    torch.testing.assert_close(policy_logps, torch.cat([chosen_logps, rejected_logps]), **END_TO_END)
    torch.testing.assert_close(ours.losses.mean(), loss, **END_TO_END)
    torch.testing.assert_close(ours.chosen_rewards, chosen_rewards, **END_TO_END)
    torch.testing.assert_close(ours.rejected_rewards, rejected_rewards, **END_TO_END)


@pytest.mark.parametrize("name", ["simpo", "orpo"])
def test_end_to_end_against_trl_cpo_and_orpo_trainers_on_a_tiny_llama(name: str) -> None:
    beta = 0.5
    model = tiny_llama(seed=2)
    batch = collated_pairs(seed=8)
    pairs = len(batch["input_ids"]) // 2
    # CPO's and ORPO's batch: chosen_* and rejected_* rows, labels -100 outside the completion
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    trl_batch = {
        f"{side}_{key}": tensor[rows]
        for side, rows in (("chosen", slice(None, pairs)), ("rejected", slice(pairs, None)))
        for key, tensor in (
            ("input_ids", batch["input_ids"]),
            ("attention_mask", batch["attention_mask"]),
            ("labels", labels),
        )
    }
    with torch.no_grad():
        summed, counts = our_logps(model, batch)
        average = summed / counts
        if name == "simpo":
            ours = simpo_loss(average[:pairs], average[pairs:], beta, gamma=0.3)
            trl = TrlCPO("simpo", beta, simpo_gamma=0.3)
        else:
            # trl's ORPO NLL: every token the attention mask keeps, prompt included, one mean over the chosen rows
            full, full_counts = our_logps(model, batch, mask="attention_mask")
            nll = -full[:pairs].sum() / full_counts[:pairs].sum()
            ours = orpo_loss(average[:pairs], average[pairs:], nll, beta)
            trl = TrlORPO(beta)
        loss, metrics = trl.get_batch_loss_metrics(model, trl_batch)
    torch.testing.assert_close(ours.losses.mean(), loss, **END_TO_END)
    assert ours.chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"], abs=1e-5)
    assert ours.rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"], abs=1e-5)


def test_which_objectives_need_a_reference_model() -> None:
    assert PREFERENCE_LOSSES == ("dpo", "ipo", "hinge", "simpo", "orpo")
    assert [needs_reference(name) for name in PREFERENCE_LOSSES] == [True, True, True, False, False]


ONE, TWO = torch.zeros(3), torch.zeros(2)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: dpo_loss(ONE, ONE, ONE, ONE, beta=0.0), "loss dpo needs beta > 0, got 0.0"),
        (lambda: hinge_loss(ONE, ONE, ONE, ONE, beta=-1), "loss hinge needs beta > 0, got -1"),
        (lambda: ipo_loss(ONE, ONE, ONE, ONE, ONE, ONE, beta=float("nan")), "loss ipo needs beta > 0, got nan"),
        (lambda: dpo_loss(ONE, ONE, ONE, ONE, 0.1, label_smoothing=0.5), "label_smoothing in [0, 0.5), got 0.5"),
        (lambda: simpo_loss(ONE, ONE, 2.0, 0.5, label_smoothing=-0.1), "label_smoothing in [0, 0.5), got -0.1"),
        (lambda: simpo_loss(ONE, ONE, 2.0, gamma=-1.0), "loss simpo needs gamma >= 0"),
        (lambda: orpo_loss(ONE, ONE, torch.tensor(1.0), beta=0), "loss orpo needs beta > 0, got 0"),
        (lambda: orpo_loss(ONE, ONE, ONE, beta=0.1), "loss orpo needs chosen_nll as one number"),
        (lambda: dpo_loss(ONE, ONE, ONE, TWO, beta=0.1), "shapes (3,), (3,), (3,), (2,)"),
        (lambda: needs_reference("kto"), "unknown preference loss 'kto': choose one of dpo, ipo, hinge, simpo, orpo"),
        (lambda: sequence_logps(torch.zeros(2, 5, 7), torch.zeros(2, 4, dtype=torch.long)), "aligned with targets"),
    ],
)
def test_bad_arguments_say_what_to_fix(call, message: str) -> None:
    with pytest.raises(InvalidInput) as error:
        call()
    assert message in str(error.value)
