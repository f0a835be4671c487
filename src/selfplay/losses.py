"""Losses as pure functions of policy and reference log-probs (summed over response tokens).

Notation: for a pair (y_w, y_l) of one prompt, ℓ_w = log πθ(y_w) − log π_ref(y_w) and
ℓ_l = log πθ(y_l) − log π_ref(y_l). In SPIN, y_w is the dataset's answer ("real") and y_l
θ_t's own ("generated"); π_ref = θ_t. Each function returns per-pair losses; the trainer
averages them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SPIN_LOSSES = ("sigmoid", "hinge")


def log_ratios(policy_w, policy_l, ref_w, ref_l) -> tuple[torch.Tensor, torch.Tensor]:
    return policy_w - ref_w, policy_l - ref_l


def spin_logistic(policy_w: torch.Tensor, policy_l: torch.Tensor, ref_w: torch.Tensor,
                  ref_l: torch.Tensor, beta: float) -> torch.Tensor:
    """SPIN's logistic loss (the paper's ℓ(t) = log(1 + exp(−t)); TRL's `sigmoid` DPO loss).

        L = −log σ(β [(log πθ(y_w) − log π_ref(y_w)) − (log πθ(y_l) − log π_ref(y_l))])
          = −log σ(β (ℓ_w − ℓ_l))
    """
    lw, ll = log_ratios(policy_w, policy_l, ref_w, ref_l)
    return -F.logsigmoid(beta * (lw - ll))


def spin_hinge(policy_w: torch.Tensor, policy_l: torch.Tensor, ref_w: torch.Tensor,
               ref_l: torch.Tensor, beta: float) -> torch.Tensor:
    """SPIN with the hinge loss ℓ(t) = max(0, 1 − t):

        L = max(0, 1 − β (ℓ_w − ℓ_l))
    """
    lw, ll = log_ratios(policy_w, policy_l, ref_w, ref_l)
    return torch.relu(1 - beta * (lw - ll))


LOSSES = {"sigmoid": spin_logistic, "hinge": spin_hinge}


def pair_loss(loss_type: str, policy_w, policy_l, ref_w, ref_l, beta: float, **extra):
    return LOSSES[loss_type](policy_w, policy_l, ref_w, ref_l, beta, **extra)
