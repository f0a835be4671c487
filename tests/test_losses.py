"""Every loss as the pure function it is: values computed by hand, and TRL as an oracle.

The hand-computed values' docstrings spell out the maths; the same token tensors go through
TRL's DPOTrainer as an oracle (loss and gradients).

Notation (selfplay.losses): ℓ_w = log πθ(y_w) − log π_ref(y_w), ℓ_l likewise; η = 1/β; d =
log πθ(y) − log π_0(y) against θ_0 (the regularized losses).
"""

import math

import pytest
import torch

from helpers import trl_oracle
from selfplay.logprobs import response_logps
from selfplay.losses import (KL_CLAMP, LOSSES, geometric_reference, kl_estimate, regularized,
                             sft_nll, spin_hinge, spin_logistic, sppo_hard, sppo_single, sppo_soft)
from selfplay.rendering import collate, encode

T = torch.tensor


def _our_logps(policy, ref, batch, chunk_size=1024):
    """TRL's token tensors ([chosen; rejected]) through our log-prob function: policy log-probs
    with gradients, reference log-probs without."""
    ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["completion_mask"].bool()
    pw, pl = response_logps(policy, ids, attn, mask, chunk_size)[0].chunk(2)
    with torch.no_grad():
        rw, rl = response_logps(ref, ids, attn, mask)[0].chunk(2)
    return pw, pl, rw, rl


# ---------------------------------------------------------------------------------------
# SPIN: the logistic and hinge losses
# ---------------------------------------------------------------------------------------

def test_spin_logistic_by_hand():
    """policy (−10, −20), reference (−12, −18): ℓ_w = 2, ℓ_l = −2, margin 4.
    β = 0.1: −log σ(0.4) = log(1 + e^−0.4) = 0.513015...; β = 1: log(1 + e^−4) = 0.018150..."""
    pw, pl, rw, rl = T([-10.0]), T([-20.0]), T([-12.0]), T([-18.0])
    assert spin_logistic(pw, pl, rw, rl, 0.1).item() == pytest.approx(math.log1p(math.exp(-0.4)))
    assert spin_logistic(pw, pl, rw, rl, 0.1).item() == pytest.approx(0.5130153, abs=1e-6)
    assert spin_logistic(pw, pl, rw, rl, 1.0).item() == pytest.approx(0.0181499, abs=1e-6)
    # policy = reference: log 2, whatever β
    assert spin_logistic(rw, rl, rw, rl, 5.0).item() == pytest.approx(math.log(2))


def test_spin_hinge_by_hand():
    """margin 4: β = 0.1 gives 1 − 0.4 = 0.6; β = 0.5 gives max(0, 1 − 2) = 0."""
    pw, pl, rw, rl = T([-10.0, -10.0]), T([-20.0, -20.0]), T([-12.0, -12.0]), T([-18.0, -18.0])
    assert spin_hinge(pw, pl, rw, rl, 0.1).tolist() == pytest.approx([0.6, 0.6])
    assert spin_hinge(pw, pl, rw, rl, 0.5).tolist() == pytest.approx([0.0, 0.0])


# ---------------------------------------------------------------------------------------
# Verified against TRL
# ---------------------------------------------------------------------------------------

def test_loss_and_gradients_equal_trl_dpo_sigmoid(tokenizer, tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}],
             "chosen": [{"role": "assistant", "content": f"{i} + {i} = {2 * i}.\nAnswer: {2 * i}"}],
             "rejected": [{"role": "assistant", "content": "I do not know. " * (i + 1)}]}
            for i in range(4)]
    policy, ref, batch, trl_loss, trl_grads = trl_oracle(tokenizer, tmp_path, rows, "sigmoid",
                                                         0.1)
    pw, pl, rw, rl = _our_logps(policy, ref, batch, chunk_size=16)
    assert (pw - rw - (pl - rl)).abs().min() > 1e-3          # a non-trivial comparison
    ours = spin_logistic(pw, pl, rw, rl, 0.1).mean()
    ours.backward()
    assert ours.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    for g_ours, g_trl in zip((p.grad for p in policy.parameters()), trl_grads):
        torch.testing.assert_close(g_ours, g_trl, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------
# SPPO: regression of the log-ratios toward the win probabilities
# ---------------------------------------------------------------------------------------

def test_sppo_soft_by_hand():
    """ℓ_w = 2, ℓ_l = −1, β = 0.5 (η = 2), P_win = 0.75, P_lose = 0.25:
    ½[(2 − 2·0.25)² + (−1 − 2·(−0.25))²] = ½[2.25 + 0.25] = 1.25."""
    pw, pl, rw, rl = T([-8.0]), T([-11.0]), T([-10.0]), T([-10.0])
    assert sppo_soft(pw, pl, rw, rl, 0.5, T([0.75]), T([0.25])).item() == pytest.approx(1.25)


def test_sppo_single_by_hand():
    """ℓ_w = 2, ℓ_l = −1, η = 2, P(w ≻ l) = 0.9: ½[(2 − 0.8)² + (−1 + 0.8)²] = ½[1.44 + 0.04]."""
    pw, pl, rw, rl = T([-8.0]), T([-11.0]), T([-10.0]), T([-10.0])
    assert sppo_single(pw, pl, rw, rl, 0.5, T([0.9])).item() == pytest.approx(0.74)


def test_sppo_hard_by_hand():
    """ℓ_w = 2, ℓ_l = −1, β = 0.5: (2 − 1)² + (−1 + 1)² = 1."""
    pw, pl, rw, rl = T([-8.0]), T([-11.0]), T([-10.0]), T([-10.0])
    assert sppo_hard(pw, pl, rw, rl, 0.5).item() == pytest.approx(1.0)


def test_sppo_hard_equals_trl(tokenizer, tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"Name a number above {i}."}],
             "chosen": [{"role": "assistant", "content": f"{i + 1}"}],
             "rejected": [{"role": "assistant", "content": f"{i - 1}, I think"}]}
            for i in range(3)]
    policy, ref, batch, trl_loss, trl_grads = trl_oracle(tokenizer, tmp_path, rows, "sppo_hard",
                                                         0.5)
    pw, pl, rw, rl = _our_logps(policy, ref, batch)
    ours = sppo_hard(pw, pl, rw, rl, 0.5).mean()
    ours.backward()
    assert ours.item() == pytest.approx(trl_loss.item(), rel=1e-5)
    # The quadratic loss's gradients are ~10x the logistic loss's, and so are float32
    # summation-order differences between TRL's fused head and our chunks (seen: 2e-5 on 3 of
    # 3.1M elements).
    for g, h in zip((p.grad for p in policy.parameters()), trl_grads):
        torch.testing.assert_close(g, h, atol=5e-5, rtol=1e-3)


# ---------------------------------------------------------------------------------------
# Regularized losses (α-SPIN, RSPO) and iterative DPO's
# ---------------------------------------------------------------------------------------

def test_geometric_reference_by_hand():
    """α = 0.25: 0.75·(−12) + 0.25·(−20) = −14; α = 0 is θ_t's tensor itself."""
    ref, base = T([-12.0]), T([-20.0])
    assert geometric_reference(ref, base, 0.25).item() == pytest.approx(-14.0)
    assert geometric_reference(ref, base, 0.0) is ref
    assert geometric_reference(ref, base, 1.0).item() == pytest.approx(-20.0)


def test_kl_estimates_by_hand():
    """d = −4: forward exp(4) = 54.598..., reverse 16; d = −20: forward clamped at exp(10).
    The forward term's gradient in log πθ is −exp(−d) unclamped, 0 where clamped."""
    pol = T([-20.0, -36.0], requires_grad=True)
    base = T([-16.0, -16.0])
    fwd = kl_estimate(pol, base, "forward")
    assert fwd.tolist() == pytest.approx([math.exp(4), math.exp(KL_CLAMP)])
    assert kl_estimate(pol, base, "reverse").tolist() == pytest.approx([16.0, 400.0])
    assert kl_estimate(pol, base, "both").tolist() == pytest.approx([math.exp(4) + 16,
                                                                     math.exp(10) + 400])
    fwd.sum().backward()
    assert pol.grad.tolist() == pytest.approx([-math.exp(4), 0.0])


def test_regularized_spin_by_hand():
    """policy (−10, −20), θ_t (−12, −18), θ_0 (−14, −16), α = 0.5: π_α = (−13, −17), ℓ_w = 3,
    ℓ_l = −3, margin 6; β = 0.1: log(1 + e^−0.6) = 0.437488...; λ = 0.5, reverse KL on the
    generated answer alone (the real one is no sample of θ_t): d_l = −4, 0.5·16 = 8."""
    pw, pl, rw, rl, bw, bl = T([-10.0]), T([-20.0]), T([-12.0]), T([-18.0]), T([-14.0]), \
        T([-16.0])
    mixed = regularized("sigmoid", pw, pl, rw, rl, 0.1, base_w=bw, base_l=bl, ref_mixture=0.5)
    assert mixed.item() == pytest.approx(math.log1p(math.exp(-0.6)))
    assert mixed.item() == pytest.approx(0.4374879, abs=1e-6)
    kl = regularized("sigmoid", pw, pl, rw, rl, 0.1, base_w=bw, base_l=bl, ref_mixture=0.5,
                     kl_coef=0.5, kl_type="reverse", kl_on_chosen=False)
    assert kl.item() == pytest.approx(0.4374879 + 8.0, abs=1e-6)


def test_regularized_sppo_by_hand():
    """RSPO: ℓ_w = 2, ℓ_l = −1, η = 2, P_win 0.75, P_lose 0.25: SPPO's 1.25; θ_0 (−9, −12):
    d_w = 1, d_l = 1; λ = 0.1, both KLs on both answers: forward e^−1 + e^−1, reverse 1 + 1:
    1.25 + 0.1·(2e^−1 + 2) = 1.523575..."""
    pw, pl, rw, rl = T([-8.0]), T([-11.0]), T([-10.0]), T([-10.0])
    probs = {"p_win": T([0.75]), "p_lose": T([0.25])}
    got = regularized("sppo", pw, pl, rw, rl, 0.5, base_w=T([-9.0]), base_l=T([-12.0]),
                      kl_coef=0.1, kl_type="both", **probs)
    assert got.item() == pytest.approx(1.25 + 0.1 * (2 * math.exp(-1) + 2))
    assert sppo_soft(pw, pl, rw, rl, 0.5, **probs).item() == pytest.approx(1.25)


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_neutral_regularization_is_the_loss_bit_for_bit(loss_type):
    """α = 0 and λ = 0 give today's losses exactly (torch.equal, not approximately)."""
    g = torch.Generator().manual_seed(0)
    pw, pl, rw, rl, bw, bl = (-50 * torch.rand(16, generator=g) for _ in range(6))
    extra = {"sppo": {"p_win": torch.rand(16, generator=g), "p_lose": torch.rand(16, generator=g)},
             "sppo_single": {"p_chosen": torch.rand(16, generator=g)}}.get(loss_type, {})
    plain = LOSSES[loss_type](pw, pl, rw, rl, 0.1, **extra)
    neutral = regularized(loss_type, pw, pl, rw, rl, 0.1, base_w=bw, base_l=bl,
                          ref_mixture=0.0, kl_coef=0.0, **extra)
    assert torch.equal(plain, neutral)
    assert not torch.equal(plain, regularized(loss_type, pw, pl, rw, rl, 0.1, base_w=bw,
                                              base_l=bl, kl_coef=1e-3, **extra))


def test_dpo_loss_is_spin_logistic():
    """Iterative DPO trains with DPO's sigmoid loss, which is SPIN's logistic loss
    (test_losses.py checks it against TRL's DPOTrainer, loss and gradients)."""
    assert LOSSES["sigmoid"] is spin_logistic


# ---------------------------------------------------------------------------------------
# SFT: the mean NLL per reference response token
# ---------------------------------------------------------------------------------------

def test_sft_nll_by_hand():
    """Summed log-probs −2 (1 token) and −6 (3 tokens): 8 nats over 4 tokens = 2.
    Per token, not per sequence: −2 over 1 and −9 over 3 give 11/4 = 2.75, where the mean of
    the per-sequence means would be (2 + 3)/2 = 2.5."""
    assert sft_nll(T([-2.0, -6.0]), T([1, 3])).item() == pytest.approx(2.0)
    assert sft_nll(T([-2.0, -9.0]), T([1, 3])).item() == pytest.approx(2.75)


def test_sft_loss_equals_transformers_labels_loss(tiny_model, tokenizer):
    """The same tokens through model(labels=...) with prompt and padding set to −100."""
    seqs = [encode(tokenizer, [{"role": "user", "content": q}], a, 512, 256) for q, a in
            [("What is 2 + 2?", "2 + 2 = 4.\nAnswer: 4"), ("Name a colour.", "Blue."),
             ("Sort 3, 1, 2.", "1, 2, 3")]]
    batch = collate(seqs, tokenizer.pad_token_id)
    labels = batch["input_ids"].masked_fill(~batch["response_mask"], -100)
    with torch.no_grad():
        hf = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        labels=labels).loss
        logp, n = response_logps(tiny_model, **batch)
    assert sft_nll(logp, n).item() == pytest.approx(hf.item(), rel=1e-5)


def test_every_loss_is_tested_here():
    assert set(LOSSES) == {"sigmoid", "hinge", "sppo", "sppo_single", "sppo_hard"}

