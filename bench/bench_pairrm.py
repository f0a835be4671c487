"""PairRM's speed on the default model's samples: comparisons per second of `--judge pairrm`.

SPPO's rank stage with PairRM compares every ordered pair of a prompt's K samples: K(K-1)
forward passes of DeBERTa-v3-large over source + two candidates. This bench measures that
work as `selfplay rank --judge pairrm` runs it (PairRM.comparison_matrices: every pair of
every prompt in one length-sorted, token-budgeted batched run):

  samples    the embedded default model's K samples per prompt (temperature 0.7, top_p 0.9,
             as `selfplay run --method sppo` samples), on task-suite train prompts
  model      PairRM's architecture (DeBERTa-v3-large: 24 layers, hidden 1024, and the head),
             with random weights: the published weights cannot be downloaded here, and the
             time of a forward pass does not depend on the values of the weights
  tokenizer  a DeBERTa-v3-layout sentencepiece unigram trained here on the suite's text (the
             published one is not here either); token counts per comparison are printed, as
             tokens/s is what carries over to the real tokenizer

Each dtype (float32, what PairRM runs in on a CPU; bfloat16, what it runs in on a GPU) is
timed on the same inputs, best of --repeats, on a GPU when there is one (--device).

    python bench/bench_pairrm.py [--prompts 4] [--k 5] [--repeats 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path


def tokenizer(texts: list[str], where: Path, vocab: int):
    """A DeBERTa-v3-layout tokenizer: [PAD] 0, [CLS] 1, [SEP] 2, [UNK] 3, then the pieces."""
    import sentencepiece as spm
    from transformers import DebertaV2Tokenizer

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(where / "spm"), vocab_size=vocab,
        hard_vocab_limit=False, model_type="unigram", pad_id=0, pad_piece="[PAD]", bos_id=1,
        bos_piece="[CLS]", eos_id=2, eos_piece="[SEP]", unk_id=3, unk_piece="[UNK]",
        character_coverage=1.0, minloglevel=2)
    DebertaV2Tokenizer.from_pretrained(where).save_pretrained(where)
    from selfplay.judges import pairrm
    return pairrm.load_tokenizer(where)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--device", default="auto", help="auto: a GPU when there is one")
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    import torch
    from transformers import DebertaV2Config

    from selfplay.data.tasks import generate as tasks
    from selfplay.engines.base import SamplingSettings, stream_seed
    from selfplay.engines.hf import HFEngine
    from selfplay.judges.pairrm import DEBERTA_V3_LARGE, DebertaV2PairRM, PairRM, source_text
    from selfplay.judges.pairrm_inputs import add_pairrm_tokens
    from selfplay.models import pick_device

    device = pick_device(args.device)

    suite = tasks("train", 2000, seed=0)
    prompts = [[{"role": "user", "content": t.prompt}] for t in suite[:args.prompts]]
    engine = HFEngine("default", str(device))
    s = SamplingSettings(max_new_tokens=128, temperature=0.7, top_p=0.9, seed=42, batch_size=64)
    flat = engine.generate([p for p in prompts for _ in range(args.k)], s,
                           seeds=[stream_seed(42, f"bench/{k}", i) for i in range(len(prompts))
                                  for k in range(args.k)])
    engine.close()
    samples = [[g.text for g in flat[i * args.k:(i + 1) * args.k]] for i in range(len(prompts))]
    sources = [source_text(p) for p in prompts]

    with tempfile.TemporaryDirectory() as tmp:
        tok = tokenizer([t.prompt for t in suite] + [t.reference for t in suite]
                        + [x for ys in samples for x in ys], Path(tmp), args.vocab)
    m = add_pairrm_tokens(tok)
    cfg = DebertaV2Config(**DEBERTA_V3_LARGE, vocab_size=max(len(tok), 128_005), n_tasks=1,
                          drop_out=0.05, source_prefix_id=m.source,
                          cand1_prefix_id=m.candidate1, cand2_prefix_id=m.candidate2,
                          cand_prefix_id=m.candidate)
    torch.manual_seed(0)
    model = DebertaV2PairRM(cfg)
    n_pairs = len(prompts) * args.k * (args.k - 1)
    encoder = PairRM(model, tok)
    pairs = [encoder.encode(x, ys).pair(i, j, m) for x, ys in zip(sources, samples)
             for i in range(args.k) for j in range(args.k) if i != j]
    n_tok = sum(len(p.input_ids) for p in pairs)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        judge = PairRM(copy.deepcopy(model).to(dtype), tok, device)
        judge.comparison_matrices(sources[:1], samples[:1])            # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            judge.comparison_matrices(sources, samples)
            best = min(best, time.perf_counter() - t)
        results[str(dtype)[6:]] = {"seconds": best, "pairs_per_s": n_pairs / best,
                                   "tokens_per_s": n_tok / best}
        del judge
    sample_tokens = sum(g.n_tokens for g in flat) / len(flat)
    print(f"\n{len(prompts)} prompts x K={args.k}: {n_pairs} ordered comparisons, "
          f"{n_tok / n_pairs:.0f} tokens each on average (samples: {sample_tokens:.0f} "
          f"tokens), on {device} ({torch.get_num_threads()} threads)")
    print(f"{'':12}{'seconds':>10}{'pairs/s':>10}{'tokens/s':>10}")
    for name, r in results.items():
        print(f"{name:12}{r['seconds']:10.1f}{r['pairs_per_s']:10.2f}{r['tokens_per_s']:10.0f}")
    f, b = results["float32"], results["bfloat16"]
    print(f"bfloat16 / float32: {b['pairs_per_s'] / f['pairs_per_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"bench": "pairrm", "prompts": len(prompts), "k": args.k, "comparisons": n_pairs,
             "tokens_per_comparison": n_tok / n_pairs, "sample_tokens": sample_tokens,
             "device": str(device), "threads": torch.get_num_threads(), "vocab": len(tok),
             "results": results},
            indent=1))


if __name__ == "__main__":
    main()
