"""Batched generation with a shrinking batch, and generation shard files.

Prompts are rendered once (rendering.prompt_ids), sorted by length so that a batch holds
prompts of similar length (little padding), left-padded, and decoded with the model's KV cache.
Unlike `model.generate`, which computes every row until the longest one ends, a row leaves the
batch (and the cache) as soon as it emits its end-of-turn token: the rest of the batch then runs
cheaper. Greedy outputs equal `model.generate`'s token for token (tested).

A shard file is written to a temporary name and renamed when complete: a finished shard is
skipped on re-run, an interrupted one is redone, and nothing is ever appended twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from selfplay.rendering import prompt_ids


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0      # 0: greedy
    top_p: float = 1.0
    seed: int = 42
    batch_size: int = 16

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Generation:
    text: str
    n_tokens: int          # generated tokens, the end-of-turn token not counted
    finish_reason: str     # "eos" or "length"


def stop_token_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gc_eos = model.generation_config.eos_token_id
    ids.update(gc_eos if isinstance(gc_eos, (list, tuple)) else [gc_eos] if gc_eos is not None
               else [])
    return sorted(i for i in ids if i is not None)


def _batch_seed(seed: int, stream: str, batch: int) -> int:
    return int(hashlib.sha256(f"{seed}/{stream}/{batch}".encode()).hexdigest()[:8], 16)


def _pick(logits: torch.Tensor, s: SamplingSettings, gen: torch.Generator | None) -> torch.Tensor:
    """Greedy, or temperature + nucleus (top-p) sampling, as vLLM and the SPPO scripts sample."""
    if s.greedy:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > s.top_p      # keeps at least the top token
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(1).to(logits.device)


@torch.no_grad()
def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, stops: list[int],
           s: SamplingSettings, gen: torch.Generator | None = None) -> list[list[int]]:
    """New tokens per row of a left-padded batch, each list ending at its first stop token."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    attn = attention_mask
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    stop_t = torch.tensor(stops, device=input_ids.device)
    alive = torch.arange(input_ids.shape[0], device=input_ids.device)
    steps: list[tuple[torch.Tensor, torch.Tensor]] = []          # (rows, tokens) per step
    logits = model(input_ids=input_ids, attention_mask=attn, position_ids=pos,
                   past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    next_pos = pos[:, -1] + 1
    for step in range(s.max_new_tokens):
        tok = _pick(logits, s, gen)
        steps.append((alive, tok))
        keep = (~torch.isin(tok, stop_t)).nonzero().squeeze(1)
        if step == s.max_new_tokens - 1 or len(keep) == 0:
            break
        if len(keep) < len(alive):               # finished rows leave the batch and the cache
            cache.batch_select_indices(keep)
            attn, alive, tok, next_pos = attn[keep], alive[keep], tok[keep], next_pos[keep]
        attn = torch.cat([attn, attn.new_ones(len(alive), 1)], dim=1)
        logits = model(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos[:, None],
                       past_key_values=cache, use_cache=True).logits[:, -1]
        next_pos = next_pos + 1
    out: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    for rows, toks in steps:
        for r, t in zip(rows.tolist(), toks.tolist()):
            out[r].append(t)
    return out


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[dict[str, str]]], settings: SamplingSettings,
             stream: str = "0", desc: str = "generate") -> list[Generation]:
    """One response per prompt, in the prompts' order.

    `stream` names this pass (sample index, shard) so that sampled passes get distinct, repeatable
    random streams: the same settings and stream give the same responses.
    """
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))   # longest first: OOM early
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    out: list[Generation | None] = [None] * len(prompts)
    n_tok, t0 = 0, time.perf_counter()
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", mininterval=1.0)
    for b, start in enumerate(range(0, len(order), settings.batch_size)):
        idx = order[start:start + settings.batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        attn = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):                 # left padding: generation continues at the end
            ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
            attn[r, width - len(encoded[i]):] = 1
        gen = None if settings.greedy else \
            torch.Generator().manual_seed(_batch_seed(settings.seed, stream, b))
        new = decode(model, ids.to(device), attn.to(device), stops, settings, gen)
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


# ---------------------------------------------------------------------------------------
# Shard files
# ---------------------------------------------------------------------------------------

def shard_name(split: str, data_frac: int, rank: int, world: int) -> str:
    return f"{split}-frac{data_frac:05d}-rank{rank:03d}-of{world:03d}.jsonl"


def fraction(n: int, data_frac: int, frac_len: int) -> tuple[int, int]:
    """[start, end) of fraction data_frac; frac_len 0 is the whole split."""
    if frac_len == 0:
        return 0, n
    start = data_frac * frac_len
    return start, min(start + frac_len, n)


def process_slice(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous, balanced [start, end) of n items for one of `world` processes."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    """Write to a temporary name, fsync, rename: readers never see a partial file."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def write_json_atomic(path: Path, obj) -> None:
    """One JSON document, written to a temporary name and renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def settings_record(model_spec: str, s: SamplingSettings, num_samples: int) -> dict:
    return {"model": model_spec, "num_samples": num_samples, **asdict(s)}


# ---------------------------------------------------------------------------------------
# The generate stage: one process's shard of one fraction of a split
# ---------------------------------------------------------------------------------------

def generate_split(cfg) -> Path | None:
    """Generate (and with cfg.score, score) this process's shard; returns its path.

    A complete shard is skipped unless cfg.overwrite; under `accelerate launch` each process
    writes its own contiguous slice of the fraction.
    """
    import sys

    from accelerate import PartialState

    from selfplay.data.formats import read_for
    from selfplay.errors import SelfplayError
    from selfplay.models import load_model
    from selfplay.scoring import score_shard_rows

    # cpu=True lets accelerate form a gloo process group when there is no GPU.
    state = PartialState(cpu=cfg.device == "cpu" or not torch.cuda.is_available())
    examples = read_for(cfg).examples
    start, end = fraction(len(examples), cfg.data_frac, cfg.frac_len)
    if start >= len(examples):
        last = (len(examples) - 1) // cfg.frac_len
        raise SelfplayError(f"--data_frac {cfg.data_frac} is past the end: the split has "
                            f"{len(examples)} prompts, so with --frac_len {cfg.frac_len} the "
                            f"last fraction is {last}.")
    lo, hi = process_slice(end - start, state.process_index, state.num_processes)
    mine = examples[start + lo:start + hi]
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / shard_name(cfg.split, cfg.data_frac, state.process_index,
                                state.num_processes)
    if path.exists() and not cfg.overwrite:
        print(f"{path} is complete; skipping it (--overwrite to redo).", file=sys.stderr)
        return path
    model, tok = load_model(cfg.model_name_or_path, str(state.device) if cfg.device == "auto"
                            else cfg.device, cfg.dtype)
    s = SamplingSettings(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed,
                         cfg.effective_batch_size())
    prompts = [e.prompt for e in mine]
    samples = [generate(model, tok, prompts, s, stream=f"{path.name}/{k}",
                        desc=f"generate {k + 1}/{cfg.num_samples}")
               for k in range(cfg.num_samples)]
    settings = settings_record(cfg.model_name_or_path, s, cfg.num_samples)
    rows = [{"prompt_id": e.prompt_id, "prompt": e.prompt, "reference": e.reference,
             "responses": [gs[i].text for gs in samples],
             "response_tokens": [gs[i].n_tokens for gs in samples],
             "finish_reasons": [gs[i].finish_reason for gs in samples],
             "extra": e.extra, "settings": settings} for i, e in enumerate(mine)]
    if cfg.score:
        score_shard_rows(model, tok, rows, cfg.model_name_or_path, cfg.max_length,
                         cfg.max_prompt_length, cfg.effective_batch_size(),
                         cfg.logprob_chunk_size)
    write_jsonl_atomic(path, rows)
    n = sum(len(r["responses"]) for r in rows)
    cut = sum(f == "length" for r in rows for f in r["finish_reasons"])
    print(f"wrote {path}: {len(rows)} prompts, {n} responses, {cut} cut by --max_new_tokens",
          file=sys.stderr)
    if state.is_main_process and rows:
        r = rows[0]
        print(f"\n[{r['prompt_id']}] {r['prompt'][-1]['content']}\n-> {r['responses'][0]}",
              file=sys.stderr)
    return path
