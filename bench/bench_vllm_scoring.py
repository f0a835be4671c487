"""Can vLLM score? Summed response log-probs from vLLM's prompt log-probs against ours.

SPIN stores θ_t's log-prob of every reference and generated answer (the reference term of the
loss). vLLM can return the log-prob of every prompt token; sent prompt + response as one
prompt, the response positions' sum is the same quantity. This script compares the two on
the same token sequences (references of the suite's train prompts, float32) and times both.

    python bench/bench_vllm_scoring.py [--pairs 128] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

from selfplay.data.tasks import split_rows
from selfplay.logprobs import score_texts
from selfplay.models import load_model
from selfplay.rendering import prompt_ids, response_ids, truncate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=128)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    rows = split_rows("train", 0, {"train": args.pairs})
    items = [(r["messages"][:1], [r["messages"][1]["content"]]) for r in rows]

    model, tok = load_model("default", "cpu", "float32")
    t = time.perf_counter()
    ours = [s[0][0] for s in score_texts(model, tok, items, 1024, 512, 64)]
    t_ours = time.perf_counter() - t
    del model

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from selfplay.engines.vllm import VllmEngine
    engine = VllmEngine("default", "cpu", "float32")
    seqs = [truncate(prompt_ids(tok, p), response_ids(tok, texts[0]), 1024, 512)
            for p, texts in items]
    t = time.perf_counter()
    outs = engine.llm.generate([TokensPrompt(prompt_token_ids=s.input_ids) for s in seqs],
                               SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False),
                               use_tqdm=False)
    theirs = [sum(d[s.input_ids[i]].logprob
                  for i, d in enumerate(o.prompt_logprobs) if i >= s.n_prompt)
              for o, s in zip(outs, seqs)]
    t_vllm = time.perf_counter() - t
    engine.close()
    diffs = [abs(a - b) for a, b in zip(ours, theirs)]
    rel = [abs(a - b) / max(abs(a), 1e-9) for a, b in zip(ours, theirs)]
    print(f"{len(seqs)} reference answers, summed log-prob (mean {sum(ours) / len(ours):.2f})")
    print(f"max |ours - vllm| {max(diffs):.2e}   mean {sum(diffs) / len(diffs):.2e}   "
          f"max relative {max(rel):.2e}")
    print(f"ours {t_ours:.1f} s   vllm {t_vllm:.1f} s (engine start not counted)   "
          f"ratio {t_ours / t_vllm:.2f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"pairs": len(seqs), "max_abs_diff": max(diffs),
                       "mean_abs_diff": sum(diffs) / len(diffs), "max_rel_diff": max(rel),
                       "ours_s": t_ours, "vllm_s": t_vllm}, fh, indent=2)


if __name__ == "__main__":
    main()
