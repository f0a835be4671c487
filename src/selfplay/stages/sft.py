"""`selfplay sft`: supervised fine-tuning on any dataset the readers accept, the step that makes
SPIN's starting model θ_0 (the alignment handbook's SFT; the paper starts from
zephyr-7b-sft-full, UltraChat-200k).

The loss is the mean negative log-likelihood per reference response token, prompt tokens
masked (losses.sft_nll, as transformers computes it from `labels`), through the same
rendering, log-prob function and training loop as `selfplay train`: full, LoRA or QLoRA,
checkpoints and exact resume, JSONL and TensorBoard metrics, a progress bar. Output: a
Hugging Face checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from selfplay.config import (DataSettings, LoraSettings, ModelSettings, ScoringSettings,
                             TrainingSettings)
from selfplay.data.run_paths import ModelPaths
from selfplay.data.splits import read_for
from selfplay.losses import sft_nll
from selfplay.rendering import Encoded, collate, prompt_ids, response_ids, truncate
from selfplay.trainer import (StepFn, claim, content_hash, loop, prepare, releases_group,
                              save_final, skip_if_complete, start)


def sequence_step(seqs: list[Encoded], pad_id: int) -> StepFn:
    """One micro-batch of prompt + reference sequences: the NLL of the reference tokens, per
    token of the whole micro-batch across processes. Their gradients are averaged, so each
    process's sum counts once per process: one process at batch 4 and two at batch 2 take
    the same update."""
    def step(forward, idx: list[int], everyone: list[int]):
        batch = collate([seqs[i] for i in idx], pad_id)
        logp, n_tok = forward(batch)
        tokens = torch.tensor([sum(seqs[i].n_response for i in everyone)], device=logp.device)
        loss = sft_nll(logp.float(), tokens) * (len(everyone) / len(idx))
        return loss, {"loss": loss.detach(), "response_tokens": n_tok.float().mean()}, \
            int(batch["attention_mask"].sum())

    return step


@releases_group
def sft(model: ModelSettings, data: DataSettings, scoring: ScoringSettings,
        training: TrainingSettings, lora: LoraSettings, out_dir: Path, *, seed: int,
        overwrite: bool = False, repeat: int = 1) -> Path:
    """Fine-tune on data's (prompt, reference) examples, each `repeat` times per epoch (the
    control arm sees each prompt as often as SPIN's previous + current pairs do); returns the
    checkpoint directory."""
    out = ModelPaths(Path(out_dir))
    if skip_if_complete(out, overwrite):
        return out.root
    accelerator, lm, tok = start(model, training, lora, out, seed)
    res = read_for(data)
    seqs = [truncate(prompt_ids(tok, e.prompt), response_ids(tok, e.reference),
                     scoring.max_length, scoring.max_prompt_length)
            for e in res.examples] * repeat
    truncated = sum(s.truncated for s in seqs[:len(res.examples)])
    if accelerator.is_main_process:
        print(f"{len(seqs)} examples; {truncated} truncated to max_length {scoring.max_length} "
              f"/ max_prompt_length {scoring.max_prompt_length}", file=sys.stderr)
    claim(accelerator, out, overwrite=overwrite, resume=training.resume)
    r = prepare(accelerator, lm, tok, [len(s.input_ids) for s in seqs],
                content_hash([(s.input_ids, s.n_prompt) for s in seqs]), training,
                scoring.logprob_chunk_size, out, seed)
    step = loop(r, training, out, sequence_step(seqs, tok.pad_token_id))
    save_final(r, lora, model, out,
               {"steps": step, "dataset": data.dataset, "split": data.split,
                "examples": len(res.examples), "repeat": repeat, "skipped_rows": len(res.skipped),
                "truncated": truncated})
    return out.root
