"""Reference scoring: θ_t's summed log-prob of every reference and response, computed once.

Stored next to the pairs, these let the trainer run with one model in memory. The truncation
settings are stored with them: a log-prob is only valid for the exact tokens it was computed on.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from selfplay.logprobs import response_logps
from selfplay.rendering import collate, prompt_ids, response_ids, truncate


@torch.no_grad()
def score_texts(model, tokenizer, items: list[tuple[list[dict[str, str]], list[str]]],
                max_length: int, max_prompt_length: int, batch_size: int = 16,
                chunk_size: int = 1024, desc: str = "score"
                ) -> list[tuple[list[float], list[int]]]:
    """For each (prompt, [texts]), the summed log-prob and token count of each text.

    Every prompt is tokenized once; sequences are sorted by length into batches.
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
        logp, ntok = response_logps(model, batch["input_ids"], batch["attention_mask"],
                                    batch["response_mask"], chunk_size)
        for k, lp, nt in zip(idx, logp.tolist(), ntok.tolist()):
            i, j = owners[k]
            out[i][0][j], out[i][1][j] = lp, nt
        bar.update(len(idx))
    bar.close()
    return out


def score_settings(model_spec: str, max_length: int, max_prompt_length: int) -> dict:
    return {"model": model_spec, "max_length": max_length, "max_prompt_length": max_prompt_length}


def score_shard_rows(model, tokenizer, rows: list[dict], model_spec: str, max_length: int,
                     max_prompt_length: int, batch_size: int, chunk_size: int) -> None:
    """Add ref_logp_* / ref_ntok_* columns to generation rows, in place."""
    items = [(r["prompt"], [r["reference"]] + r["responses"]) for r in rows]
    scored = score_texts(model, tokenizer, items, max_length, max_prompt_length, batch_size,
                         chunk_size)
    settings = score_settings(model_spec, max_length, max_prompt_length)
    for r, (lps, nts) in zip(rows, scored):
        r["ref_logp_reference"], r["ref_ntok_reference"] = lps[0], nts[0]
        r["ref_logp_responses"], r["ref_ntok_responses"] = lps[1:], nts[1:]
        r["score_settings"] = settings
