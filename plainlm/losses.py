"""The preference-tuning objectives (DPO, IPO, hinge, SimPO, ORPO) as pure functions of per-sequence
log-probabilities, and `sequence_logps`, which makes those log-probabilities from a model's logits.

No model, data or loop lives here: the training loop runs the forward passes, calls `sequence_logps` on
each model's logits, and hands the sums (or per-token averages) to one objective below. Each objective
takes per-pair tensors of shape (P,) and returns a `PreferenceLoss`: per-pair losses, whose mean is the
batch's loss, and the implicit rewards trl logs. Every formula is trl 1.16.0's; each docstring names
the trl code it equals, and tests/test_losses.py checks that against trl itself.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from plainlm.errors import InvalidInput

PREFERENCE_LOSSES = ("dpo", "ipo", "hinge", "simpo", "orpo")
# SimPO and ORPO score the policy alone; the others compare it with a frozen reference model.
_NEEDS_REFERENCE = frozenset({"dpo", "ipo", "hinge"})


class PreferenceLoss(NamedTuple):
    """What every objective returns: per-pair losses (P,) whose mean is the batch's loss, and the implicit
    rewards (P,) of the chosen and rejected completions, detached, as trl logs them (rewards/chosen etc.)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def needs_reference(name: str) -> bool:
    """Whether the objective `name` needs a reference model's log-probabilities (dpo, ipo, hinge do)."""
    if name not in PREFERENCE_LOSSES:
        raise InvalidInput(f"unknown preference loss {name!r}: choose one of {', '.join(PREFERENCE_LOSSES)}")
    return name in _NEEDS_REFERENCE


def sequence_logps(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the summed log-probability of the targets, and how many targets were counted.

    logits (B, T, V) are already aligned with targets (B, T): logits[:, t] predict targets[:, t]. Positions
    whose target is `ignore_index` (the prompt, padding) count nothing. Returns (summed_logps (B,) float32,
    token_counts (B,) int64); summed_logps / token_counts is the per-token average SimPO and ORPO use.

    log_softmax(x)[y] = x[y] - logsumexp(x), in float32 whatever the logits' dtype. One row at a time, so
    that a bf16 model's logits are upcast a (T, V) row at a time rather than as a whole (B, T, V) copy, and
    no full log_softmax is ever materialised.
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise InvalidInput(
            f"sequence_logps needs logits (B, T, V) aligned with targets (B, T), got logits {tuple(logits.shape)} "
            f"and targets {tuple(targets.shape)}: shift them so that logits[:, t] predict targets[:, t]"
        )
    counted = targets != ignore_index
    # Ignored positions gather token 0 and are zeroed afterwards: their index may be out of the vocabulary.
    safe_targets = torch.where(counted, targets, 0)
    sums = []
    for row_logits, row_targets, row_counted in zip(logits, safe_targets, counted, strict=True):
        row_logits = row_logits.float()
        picked = row_logits.gather(-1, row_targets.unsqueeze(-1)).squeeze(-1)
        per_token = picked - torch.logsumexp(row_logits, dim=-1)
        # where, not a product: a non-finite logit at an ignored position must not reach the sum as NaN.
        sums.append(torch.where(row_counted, per_token, 0.0).sum())
    return torch.stack(sums), counted.sum(dim=-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """DPO (Rafailov et al. 2023), conservative with label_smoothing > 0 (cDPO, Mitchell 2023).

    Inputs are summed completion log-probabilities (P,) of the policy and the reference model. With
    Δ = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected) and ε = label_smoothing:

        loss = -(1 - ε) log σ(β Δ) - ε log σ(-β Δ)
        chosen_reward = β (policy_chosen - reference_chosen), rejected_reward likewise

    ε = 0 is trl 1.16.0's DPOTrainer, loss_type="sigmoid" (trl/trainer/dpo_trainer.py, DPOTrainer._compute_loss,
    with the default f_divergence_type="reverse_kl", ld_alpha=None, use_weighting=False). trl 1.16 no longer
    applies label_smoothing to "sigmoid" (it only feeds "robust", "exo_pair" and "aot"); the ε > 0 form is the
    one trl's DPOTrainer.dpo_loss applied before 1.0 and that trl 1.16's CPOTrainer.cpo_loss, loss_type="sigmoid"
    (trl/experimental/cpo/cpo_trainer.py) still applies to its logit difference. ε is the probability that a
    preference label is flipped, in [0, 0.5).
    """
    _check_beta("dpo", beta)
    _check_label_smoothing("dpo", label_smoothing)
    _check_pairs("dpo", policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    chosen_logratios = policy_chosen - reference_chosen
    rejected_logratios = policy_rejected - reference_rejected
    logits = beta * (chosen_logratios - rejected_logratios)
    losses = -F.logsigmoid(logits)
    if label_smoothing > 0:
        losses = losses * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
    return PreferenceLoss(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def ipo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float,
) -> PreferenceLoss:
    """IPO (Azar et al. 2023, Eq. 17; β is the paper's τ), on per-token averages of the log-ratios.

    Inputs are summed completion log-probabilities (P,) as for DPO, and each completion's token count (P,).
    trl divides each summed log-ratio by its completion's token count (at least 1) before the square, so that
    the loss does not grow with the completion's length; the rewards stay the summed ones, as for DPO:

        Δ = (policy_chosen - reference_chosen) / chosen_tokens
            - (policy_rejected - reference_rejected) / rejected_tokens
        loss = (Δ - 1 / (2β))²
        chosen_reward = β (policy_chosen - reference_chosen), rejected_reward likewise (not divided)

    This is trl 1.16.0's DPOTrainer, loss_type="ipo" (trl/trainer/dpo_trainer.py, DPOTrainer._compute_loss),
    whose token count is the completion_mask's sum: the completion's tokens, which `sequence_logps` counts.
    """
    _check_beta("ipo", beta)
    _check_pairs(
        "ipo", policy_chosen, policy_rejected, reference_chosen, reference_rejected, chosen_tokens, rejected_tokens
    )
    chosen_logratios = policy_chosen - reference_chosen
    rejected_logratios = policy_rejected - reference_rejected
    chosen_average = chosen_logratios / chosen_tokens.clamp(min=1.0)
    rejected_average = rejected_logratios / rejected_tokens.clamp(min=1.0)
    losses = (chosen_average - rejected_average - 1 / (2 * beta)) ** 2
    return PreferenceLoss(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def hinge_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> PreferenceLoss:
    """The hinge loss of SLiC (Zhao et al. 2023) on DPO's log-ratio difference; 1/β is the margin.

    Inputs are summed completion log-probabilities (P,) as for DPO. With Δ as in `dpo_loss`:

        loss = max(0, 1 - β Δ)
        chosen_reward = β (policy_chosen - reference_chosen), rejected_reward likewise

    This is trl 1.16.0's DPOTrainer, loss_type="hinge" (trl/trainer/dpo_trainer.py, DPOTrainer._compute_loss).
    """
    _check_beta("hinge", beta)
    _check_pairs("hinge", policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    chosen_logratios = policy_chosen - reference_chosen
    rejected_logratios = policy_rejected - reference_rejected
    losses = torch.relu(1 - beta * (chosen_logratios - rejected_logratios))
    return PreferenceLoss(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def simpo_loss(
    policy_chosen_avg: torch.Tensor,
    policy_rejected_avg: torch.Tensor,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """SimPO (Meng et al. 2024): no reference model, per-token average log-probabilities, a target margin γ.

    Inputs are the policy's completion log-probabilities averaged per token (P,): summed_logps / token_counts
    from `sequence_logps`. With ε = label_smoothing:

        z = β (policy_chosen_avg - policy_rejected_avg) - γ
        loss = -(1 - ε) log σ(z) - ε log σ(-z)
        chosen_reward = β policy_chosen_avg, rejected_reward = β policy_rejected_avg

    This is trl 1.16.0's CPOTrainer.cpo_loss with loss_type="simpo" and alpha=0
    (trl/experimental/cpo/cpo_trainer.py). trl's simpo_gamma is the paper's γ, a margin in reward units: it
    subtracts γ/β from the average log-probability difference and then multiplies by β. CPOTrainer's total
    loss adds cpo_alpha times the chosen completions' token-mean NLL, and cpo_alpha defaults to 1.0 even for
    "simpo"; this function is the SimPO paper's loss, trl's with cpo_alpha=0.
    """
    _check_beta("simpo", beta)
    _check_label_smoothing("simpo", label_smoothing)
    if not (math.isfinite(gamma) and gamma >= 0):
        raise InvalidInput(
            f"loss simpo needs gamma >= 0 (the target reward margin), got {gamma}: the SimPO paper uses 0.5 to 1.6"
        )
    _check_pairs("simpo", policy_chosen_avg, policy_rejected_avg)
    logits = beta * ((policy_chosen_avg - policy_rejected_avg) - gamma / beta)
    losses = -F.logsigmoid(logits)
    if label_smoothing > 0:
        losses = losses * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
    return PreferenceLoss(losses, beta * policy_chosen_avg.detach(), beta * policy_rejected_avg.detach())


def orpo_loss(
    policy_chosen_avg: torch.Tensor,
    policy_rejected_avg: torch.Tensor,
    chosen_nll: torch.Tensor,
    beta: float,
) -> PreferenceLoss:
    """ORPO (Hong et al. 2024): the chosen completions' NLL plus β times an odds-ratio term; no reference model.

    policy_chosen_avg, policy_rejected_avg (P,) are the policy's completion log-probabilities averaged per
    token (summed_logps / token_counts from `sequence_logps`). chosen_nll is a scalar: the batch's chosen
    rows' negative log-likelihood, averaged over all their tokens together (one mean over the batch, not a
    mean of per-row means), and over the whole sequence, prompt included: trl predicts every token after the
    first that the attention mask keeps. With `sequence_logps` over those targets of the P chosen rows,
    chosen_nll = -summed_logps.sum() / token_counts.sum(). β is the paper's λ. With log odds(p) =
    log p - log(1 - p):

        log_odds = (policy_chosen_avg - policy_rejected_avg)
                   - (log(1 - exp(policy_chosen_avg)) - log(1 - exp(policy_rejected_avg)))
        loss = chosen_nll - β log σ(log_odds)      (the same chosen_nll on every row)
        chosen_reward = β policy_chosen_avg, rejected_reward = β policy_rejected_avg

    This is trl 1.16.0's ORPOTrainer (trl/experimental/orpo/orpo_trainer.py): odds_ratio_loss gives the
    per-pair β log σ(log_odds) (with that sign) and the rewards, concatenated_forward the NLL, and
    get_batch_loss_metrics the total, nll - mean(β log σ(log_odds)), which is losses.mean() here. Like trl,
    the log-probabilities are upcast to float32 and log(1 - exp(x)) is computed stably (log1mexp).
    """
    _check_beta("orpo", beta)
    _check_pairs("orpo", policy_chosen_avg, policy_rejected_avg)
    if chosen_nll.dim() != 0:
        raise InvalidInput(
            f"loss orpo needs chosen_nll as one number (the token-mean NLL of the batch's chosen rows), got shape "
            f"{tuple(chosen_nll.shape)}: divide the summed log-probabilities by the summed token counts"
        )
    chosen, rejected = policy_chosen_avg.float(), policy_rejected_avg.float()
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    losses = chosen_nll - beta * F.logsigmoid(log_odds)
    return PreferenceLoss(losses, beta * chosen.detach(), beta * rejected.detach())


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, without cancellation: log1p(-exp(x)) below -log 2, log(-expm1(x)) above."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _check_beta(loss: str, beta: float) -> None:
    if not (math.isfinite(beta) and beta > 0):
        raise InvalidInput(f"loss {loss} needs beta > 0, got {beta}: trl's default is 0.1")


def _check_label_smoothing(loss: str, label_smoothing: float) -> None:
    if not 0 <= label_smoothing < 0.5:
        raise InvalidInput(
            f"loss {loss} needs label_smoothing in [0, 0.5), got {label_smoothing}: it is the probability that a "
            "preference label is flipped; 0 turns smoothing off"
        )


def _check_pairs(loss: str, *tensors: torch.Tensor) -> None:
    # Broadcasting would quietly pair every chosen with every rejected completion.
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise InvalidInput(
            f"loss {loss} needs one (P,) tensor per pair quantity, all of one shape, got shapes "
            f"{', '.join(str(tuple(t.shape)) for t in tensors)}: pass one value per preference pair"
        )
