"""Losses as pure functions of policy and reference log-probs (summed over response tokens).

Notation: for a pair (y_w, y_l) of one prompt, ℓ_w = log πθ(y_w) − log π_ref(y_w) and
ℓ_l = log πθ(y_l) − log π_ref(y_l). In SPIN, y_w is the dataset's answer ("real") and y_l
θ_t's own ("generated"); in SPPO, the most and least preferred of θ_t's K samples. π_ref = θ_t.
Each function returns per-pair losses; the trainer averages them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


def sppo_soft(policy_w: torch.Tensor, policy_l: torch.Tensor, ref_w: torch.Tensor,
              ref_l: torch.Tensor, beta: float, p_win: torch.Tensor,
              p_lose: torch.Tensor) -> torch.Tensor:
    """SPPO (the paper's loss, uclaml/SPPO `sppo`): each log-ratio regresses toward η times its
    response's estimated win rate against θ_t, centred at ½; η = 1/β.

        L = ½ [(ℓ_w − η (P̂(y_w ≻ π_t) − ½))² + (ℓ_l − η (P̂(y_l ≻ π_t) − ½))²]
    """
    lw, ll = log_ratios(policy_w, policy_l, ref_w, ref_l)
    eta = 1.0 / beta
    return 0.5 * ((lw - eta * (p_win - 0.5)) ** 2 + (ll - eta * (p_lose - 0.5)) ** 2)


def sppo_single(policy_w: torch.Tensor, policy_l: torch.Tensor, ref_w: torch.Tensor,
                ref_l: torch.Tensor, beta: float, p_chosen: torch.Tensor) -> torch.Tensor:
    """SPPO with the pair's own preference P(y_w ≻ y_l) in both terms, with opposite signs
    (uclaml/SPPO `sppo_single`); η = 1/β.

        L = ½ [(ℓ_w − η (P(y_w ≻ y_l) − ½))² + (ℓ_l + η (P(y_w ≻ y_l) − ½))²]
    """
    lw, ll = log_ratios(policy_w, policy_l, ref_w, ref_l)
    eta = 1.0 / beta
    return 0.5 * ((lw - eta * (p_chosen - 0.5)) ** 2 + (ll + eta * (p_chosen - 0.5)) ** 2)


def sppo_hard(policy_w: torch.Tensor, policy_l: torch.Tensor, ref_w: torch.Tensor,
              ref_l: torch.Tensor, beta: float) -> torch.Tensor:
    """SPPO with hard labels, P = 1 for the winner and 0 for the loser (TRL's `sppo_hard`):

        L = (ℓ_w − 1/(2β))² + (ℓ_l + 1/(2β))²
    """
    lw, ll = log_ratios(policy_w, policy_l, ref_w, ref_l)
    return (lw - 0.5 / beta) ** 2 + (ll + 0.5 / beta) ** 2


def sft_nll(policy_logp: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    """Supervised fine-tuning: the mean negative log-likelihood per reference response token
    of a batch, prompt tokens masked, as transformers computes it from `labels` (the prompt
    set to −100):

        L = − Σ_b log πθ(y_b | x_b) / Σ_b |y_b|

    where log πθ(y_b | x_b) is the summed log-prob of sequence b's response tokens. One
    scalar: a long answer weighs by its tokens, not as one sequence.
    """
    return -policy_logp.sum() / n_tokens.sum().clamp(min=1)


LOSSES = {"sigmoid": spin_logistic, "hinge": spin_hinge, "sppo": sppo_soft,
          "sppo_single": sppo_single, "sppo_hard": sppo_hard}


def pair_loss(loss_type: str, policy_w, policy_l, ref_w, ref_l, beta: float, **extra):
    return LOSSES[loss_type](policy_w, policy_l, ref_w, ref_l, beta, **extra)
