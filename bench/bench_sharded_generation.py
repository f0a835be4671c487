"""Generation under sharding: the HF engine on the weights gathered once, against decoding with
the sharded (FSDP2) model itself. Run under a launcher:

    accelerate launch --multi_gpu --num_processes 2 bench/bench_sharded_generation.py \
        [--prompts 16] [--max_new_tokens 32] [--json out.json]

Both ways answer the same prompts, each process its half, greedily, for exactly
max_new_tokens tokens (a sharded forward is a collective: every process must take the same
number of steps). "gathered": every process holds the whole model (what `selfplay run` does
after a sharded training, which saves the whole model). "sharded": every process holds its
slice and FSDP gathers each layer for every step's forward. Printed: tokens/s of all
processes together, and each way's peak resident memory per process, side by side.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import PartialState
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from selfplay.data.formats import read_examples  # noqa: E402
from selfplay.models import ensure_default_model, load_tokenizer  # noqa: E402
from selfplay.rendering import prompt_ids  # noqa: E402
from selfplay.sharding import decoder_layers, mesh_of  # noqa: E402


def batch(tok, prompts) -> dict[str, torch.Tensor]:
    ids = [prompt_ids(tok, p) for p in prompts]
    width = max(map(len, ids))
    return {"input_ids": torch.tensor([[tok.pad_token_id] * (width - len(x)) + x for x in ids]),
            "attention_mask": torch.tensor([[0] * (width - len(x)) + [1] * len(x)
                                            for x in ids])}


def decode(model, inputs, n: int) -> tuple[float, list[list[int]]]:
    """Greedy, exactly n new tokens: (seconds, the new tokens)."""
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=inputs["input_ids"][0, 0].item())
    return time.perf_counter() - t, out[:, inputs["input_ids"].shape[1]:].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max_new_tokens", type=int, default=32)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    state = PartialState(cpu=True)
    rank, world = state.process_index, state.num_processes
    path = ensure_default_model()
    tok = load_tokenizer(str(path))
    examples = read_examples("builtin:tasks", "test", max_prompts=a.prompts).examples
    share = a.prompts // world
    inputs = batch(tok, [e.prompt for e in examples[rank * share:(rank + 1) * share]])
    tokens = a.prompts * a.max_new_tokens

    whole = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    secs, gathered = decode(whole, inputs, a.max_new_tokens)
    secs = torch.tensor(secs)
    dist.all_reduce(secs, op=dist.ReduceOp.MAX)
    rss_gathered = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    full = whole.state_dict() if rank == 0 else None
    if rank != 0:
        config = whole.config
        del whole
        with torch.device("meta"):
            whole = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    mesh = mesh_of(torch.device("cpu"))
    for layer in decoder_layers(whole):
        fully_shard(layer, mesh=mesh)
    fully_shard(whole, mesh=mesh)
    if rank != 0:
        whole.to_empty(device="cpu")
    set_model_state_dict(whole, full or {}, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=True))
    for _, buf in whole.named_buffers():
        dist.broadcast(buf.data, src=0)
    del full
    sharded_secs, sharded = decode(whole, inputs, a.max_new_tokens)
    sharded_secs = torch.tensor(sharded_secs)
    dist.all_reduce(sharded_secs, op=dist.ReduceOp.MAX)
    same = torch.tensor(int(sharded == gathered))
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    rss = [None] * world
    dist.all_gather_object(rss, rss_gathered)
    if rank == 0:
        out = {"processes": world, "prompts": a.prompts, "max_new_tokens": a.max_new_tokens,
               "gathered_tokens_per_s": tokens / secs.item(),
               "sharded_tokens_per_s": tokens / sharded_secs.item(),
               "same_tokens": bool(same.item()),
               "peak_rss_gathered_bytes_per_process": rss}
        print(f"| way | tokens/s, {world} processes | vs gathered |\n|---|---|---|\n"
              f"| gathered (whole model per process) | {out['gathered_tokens_per_s']:.1f} | "
              f"1.00x |\n| sharded (FSDP2 forward per step) | "
              f"{out['sharded_tokens_per_s']:.1f} | "
              f"{out['sharded_tokens_per_s'] / out['gathered_tokens_per_s']:.2f}x |\n"
              f"same tokens: {out['same_tokens']}")
        if a.json:
            Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
