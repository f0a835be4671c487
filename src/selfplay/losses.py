"""Losses as pure functions of policy and reference log-probs (summed over response tokens).

Notation: for a pair (y_w, y_l) of one prompt, ℓ_w = log πθ(y_w) − log π_ref(y_w) and
ℓ_l = log πθ(y_l) − log π_ref(y_l). In SPIN, y_w is the dataset's answer ("real") and y_l
θ_t's own ("generated"); in SPPO and iterative DPO, the most and least preferred of θ_t's K
samples. π_ref = θ_t. Each function returns per-pair losses; the trainer averages them.

The regularized losses also read θ_0's log-probs (log π_0, the base policy: the model the
first iteration started from) of the same answers: d_w = log πθ(y_w) − log π_0(y_w), d_l
likewise.
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


# RSPO's clamp on the forward KL's log importance weight (xiaohangt/RSPO: R = 10).
KL_CLAMP = 10.0
KL_TYPES = ("forward", "reverse", "both")


def geometric_reference(ref: torch.Tensor, base: torch.Tensor, alpha: float) -> torch.Tensor:
    """The reference of regularized SPIN (α-SPIN, arXiv 2404.04291): the geometric mixture of
    θ_t and θ_0, which is what a KL penalty toward θ_0 in the opponent's update amounts to:

        log π_α(y) = (1 − α) log π_t(y) + α log π_0(y) − log Z_α(x)

    Z_α(x) is the same for every answer to x, so it cancels in ℓ_w − ℓ_l: the mixture needs
    only the stored log-probs of both models. α = 0 is θ_t (SPIN), α = 1 θ_0 (a fixed
    reference, as one DPO)."""
    return ref if alpha == 0 else (1 - alpha) * ref + alpha * base


def kl_estimate(policy: torch.Tensor, base: torch.Tensor, kl_type: str) -> torch.Tensor:
    """A KL divergence between θ and θ_0 estimated on one answer y sampled from θ_t, as RSPO
    (arXiv 2503.00030; xiaohangt/RSPO's `sppo_forwardimportance`, `sppo_reversekl`) does,
    with d = log πθ(y) − log π_0(y) summed over the answer's tokens:

        forward  KL(π_0 ‖ πθ):  exp(min(−d, R)), R = 10  (importance weight π_0/πθ, clamped;
                                its gradient is −(π_0/πθ) ∇ log πθ)
        reverse  KL(πθ ‖ π_0):  d²
        both     the sum of the two
    """
    d = policy - base
    forward = torch.exp(torch.clamp(-d, max=KL_CLAMP))
    reverse = d ** 2
    return {"forward": forward, "reverse": reverse, "both": forward + reverse}[kl_type]


def regularized(loss_type: str, policy_w, policy_l, ref_w, ref_l, beta: float, *,
                base_w: torch.Tensor, base_l: torch.Tensor, ref_mixture: float = 0.0,
                kl_coef: float = 0.0, kl_type: str = "both", kl_on_chosen: bool = True,
                **extra) -> torch.Tensor:
    """A pair loss regularized toward θ_0: regularized SPIN (α-SPIN, arXiv 2404.04291) and
    regularized SPPO (RSPO, arXiv 2503.00030), with λ = kl_coef:

        L = loss(ℓ_w^α, ℓ_l^α) + λ [KL̂(y_w) + KL̂(y_l)],   ℓ^α = log πθ(y) − log π_α(y)

    where π_α is the geometric mixture of θ_t and θ_0 (`geometric_reference`, α =
    ref_mixture) and KL̂ RSPO's estimate (`kl_estimate`). In SPIN the chosen answer is the
    dataset's, not a sample of θ_t, so its KL term is left out (kl_on_chosen false). At α = 0
    and λ = 0 it is the unregularized loss, bit for bit.
    """
    loss = LOSSES[loss_type](policy_w, policy_l, geometric_reference(ref_w, base_w, ref_mixture),
                             geometric_reference(ref_l, base_l, ref_mixture), beta, **extra)
    if kl_coef:
        kl = kl_estimate(policy_l, base_l, kl_type)
        if kl_on_chosen:
            kl = kl + kl_estimate(policy_w, base_w, kl_type)
        loss = loss + kl_coef * kl
    return loss


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
