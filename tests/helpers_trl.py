"""trl's trainers reduced to the methods the tests compare against, on stand-ins that hold only the attributes
those methods read (set as the trainers' __init__ sets them, trl 1.16.0): building a real trainer needs a
dataset, a tokenizer and a Trainer, and the tests want trl's loss code, not its training loop."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import torch
from trl.trainer.dpo_trainer import DPOTrainer


class RecordingAccelerator:
    """accelerate's Accelerator on one CPU process; remembers what trl gathers (its per-pair rewards)."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.gathered: list[torch.Tensor] = []

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        self.gathered.append(tensor)
        return tensor

    def gather_for_metrics(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def unwrap_model(self, model):
        return model


class TrlDPO:
    """DPOTrainer._compute_loss on the attributes it reads, as DPOTrainer.__init__ sets them (trl 1.16.0)."""

    _compute_loss = DPOTrainer._compute_loss

    def __init__(
        self, model, loss_type: str, beta: float, label_smoothing: float = 0.0, ref_model=None, peft: bool = False
    ) -> None:
        self.model, self.ref_model = model, ref_model
        # Without a reference model, inputs carry ref_chosen_logps and ref_rejected_logps, unless the model is a
        # peft model: then the reference is the model with its adapters disabled.
        self.precompute_ref_logps = ref_model is None and not peft
        self.beta, self.label_smoothing = beta, label_smoothing
        self.loss_types, self.loss_weights = [loss_type], [1.0]
        # DPOConfig's defaults: no LD-DPO, reverse-KL (plain DPO), no WPO weighting; a dense model
        self.ld_alpha, self.f_divergence_type = None, "reverse_kl"
        self.use_weighting, self.aux_loss_enabled = False, False
        self.args = SimpleNamespace(gradient_checkpointing_kwargs=None)
        self._metrics, self._total_train_tokens = {"train": defaultdict(list), "eval": defaultdict(list)}, 0
        self._tp_size = 1  # no tensor parallelism
        self.accelerator = RecordingAccelerator()

    def loss(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """trl's loss (the mean over pairs), its per-pair chosen and rejected rewards and log-probabilities."""
        self.accelerator.gathered.clear()
        loss = self._compute_loss(self.model, inputs, return_outputs=False)
        # _compute_loss gathers chosen_rewards, rejected_rewards, accuracies, margins, chosen_logps, rejected_logps
        assert len(self.accelerator.gathered) == 6
        chosen_rewards, rejected_rewards, _, _, chosen_logps, rejected_logps = self.accelerator.gathered
        return loss, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps
