"""The one log-prob function: summed log-probs of response tokens, for scoring, training, evaluation.

`response_logps` is the kernel; `score_texts` runs it over many (prompt, texts) items in
length-sorted batches without gradients (reference log-probs, reference likelihood).

It runs the model's backbone once, keeps the hidden states at response positions only, and
applies the output layer to them in chunks, so no [batch, length, vocab] float32 tensor ever
exists: the largest is [chunk, vocab]. Under autograd each chunk is checkpointed, so backward
recomputes a chunk's logits instead of keeping them all.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from selfplay.rendering import collate, prompt_ids, response_ids, truncate


def autocast(device: torch.device, bf16: bool):
    """--bf16 for inference: float32 weights, matrix products in bfloat16, as accelerate's
    autocast runs training, so that log-probs scored before training are the ones the trainer
    would compute at its first step."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def _split_lm(model: nn.Module) -> tuple[nn.Module, nn.Module, float | None]:
    """(backbone, output layer, logit soft-cap) of a causal LM, PEFT-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = base.get_decoder() if hasattr(base, "get_decoder") else base.base_model
    cap = getattr(base.config, "final_logit_softcapping", None)
    return backbone, base.get_output_embeddings(), cap


def _chunk_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                 cap: float | None) -> torch.Tensor:
    logits = head(hidden).float()
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def response_logps(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   response_mask: torch.Tensor, chunk_size: int = 1024
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of the response tokens of each sequence.

    log π(y | x) = Σ_{t ∈ response} log softmax(W h_{t-1})[y_t]

    Args:
        input_ids, attention_mask: [B, L], right-padded.
        response_mask: [B, L] bool, True at response tokens (never at position 0).
    Returns:
        (logp_sum [B] float32, n_tokens [B] long).
    """
    backbone, head, cap = _split_lm(model)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                      use_cache=False).last_hidden_state            # [B, L, H]
    target_mask = response_mask[:, 1:]
    h = hidden[:, :-1][target_mask]                                 # [N, H] response positions
    targets = input_ids[:, 1:][target_mask]                         # [N]
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None] \
        .expand_as(target_mask)[target_mask]
    parts = []
    for i in range(0, h.shape[0], chunk_size):
        hc, tc = h[i:i + chunk_size], targets[i:i + chunk_size]
        if torch.is_grad_enabled() and hc.requires_grad:
            parts.append(checkpoint(_chunk_logps, head, hc, tc, cap, use_reentrant=False))
        else:
            parts.append(_chunk_logps(head, hc, tc, cap))
    token_logps = torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)
    sums = torch.zeros(input_ids.shape[0], device=input_ids.device, dtype=torch.float32)
    sums = sums.index_add(0, rows, token_logps)
    return sums, target_mask.sum(dim=1)


class ResponseLogProbs(nn.Module):
    """The log-prob function as a module, so that DDP/FSDP/DeepSpeed wrap it and see its forward."""

    def __init__(self, model: nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, input_ids, attention_mask, response_mask):
        return response_logps(self.model, input_ids, attention_mask, response_mask,
                              self.chunk_size)


@torch.no_grad()
def score_texts(model, tokenizer, items: list[tuple[list[dict[str, str]], list[str]]],
                max_length: int, max_prompt_length: int, batch_size: int = 16,
                chunk_size: int = 1024, desc: str = "score", bf16: bool = False
                ) -> list[tuple[list[float], list[int]]]:
    """For each (prompt, [texts]), the summed log-prob and token count of each text.

    Every prompt is tokenized once; sequences are sorted by length into batches. With bf16,
    under the autocast training runs in (`autocast`).
    """
    seqs, owners = [], []
    for i, (prompt, texts) in enumerate(items):
        p = prompt_ids(tokenizer, prompt)
        for j, t in enumerate(texts):
            seqs.append(truncate(p, response_ids(tokenizer, t), max_length, max_prompt_length))
            owners.append((i, j))
    out = [([0.0] * len(t), [0] * len(t)) for _, t in items]
    order = sorted(range(len(seqs)), key=lambda k: -len(seqs[k].input_ids))
    device = next(model.parameters()).device
    bar = tqdm(total=len(seqs), desc=desc, unit="seq", mininterval=1.0)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in
                 collate([seqs[k] for k in idx], tokenizer.pad_token_id).items()}
        with autocast(device, bf16):
            logp, ntok = response_logps(model, batch["input_ids"], batch["attention_mask"],
                                        batch["response_mask"], chunk_size)
        for k, lp, nt in zip(idx, logp.tolist(), ntok.tolist()):
            i, j = owners[k]
            out[i][0][j], out[i][1][j] = lp, nt
        bar.update(len(idx))
    bar.close()
    return out
