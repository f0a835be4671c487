"""Generation throughput: the official SPIN recipe's way, our HF engine and vLLM, side by side.

official  fixed batch of 16, prompts in file order, plain `model.generate`, greedy
          (spin/generate.py's loop; same chat-rendered prompts, so the tokens are comparable)
selfplay  prompts sorted by length, a batch that shrinks as rows finish (engines/hf.py),
          at batch 16 and at the default batch size
vllm      engines/vllm.py (when vLLM is installed), in the model's dtype and in bfloat16,
          and on CPU also compiled (--vllm_compile true) and without tcmalloc
          (SELFPLAY_TCMALLOC=0); each engine's start is timed apart from its generation
K = 5     with --samples 5: five sampled answers per prompt (temperature 0.7, top_p 0.9, as
          SPPO samples), our HF engine against vLLM
rounds    with --rounds N: only our HF engine (default batch) and vLLM as `--engine vllm` runs
          it, N times in alternating order (a fresh vLLM engine each round), so that the ratio
          comes with a 95% interval from paired rounds rather than one run on a shared machine

Tokens/s counts generated tokens up to each response's end-of-turn token, the same way for all.
Greedy outputs should agree; the script prints how many do.

    python bench/bench_generation.py [--prompts 256] [--max_new_tokens 256] [--samples 5]
                                     [--rounds 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
from transformers import GenerationConfig

from selfplay.data.tasks import split_rows
from selfplay.engines import vllm_installed
from selfplay.engines.base import SamplingSettings, stop_token_ids, stream_seed
from selfplay.engines.hf import generate
from selfplay.models import load_model
from selfplay.rendering import prompt_ids
from selfplay.stats import ratio_interval


def official(model, tok, prompts, max_new_tokens, batch_size=16):
    """spin/generate.py's way: file order, left padding, model.generate, greedy."""
    stops = stop_token_ids(model.generation_config.eos_token_id, tok)
    gc = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                          pad_token_id=tok.pad_token_id)
    tok.padding_side = "left"
    texts, n_tokens = [], 0
    for i in range(0, len(prompts), batch_size):
        enc = [prompt_ids(tok, p) for p in prompts[i:i + batch_size]]
        width = max(map(len, enc))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(e)) + e for e in enc])
        attn = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
        out = model.generate(input_ids=ids.to(model.device), attention_mask=attn.to(model.device),
                             generation_config=gc)[:, width:].tolist()
        for row in out:
            n = next((k for k, t in enumerate(row) if t in stops), len(row))
            texts.append(tok.decode(row[:n], skip_special_tokens=True).strip())
            n_tokens += n
    return texts, n_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--max_new_tokens", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=0, help="selfplay's batch (0: its default)")
    ap.add_argument("--samples", type=int, default=0, help="K sampled answers per prompt, "
                    "HF engine against vLLM (0: greedy only)")
    ap.add_argument("--sampling_only", action="store_true", help="with --samples: only the "
                    "sampled ways")
    ap.add_argument("--no_vllm", action="store_true")
    ap.add_argument("--rounds", type=int, default=0, help="paired rounds of our HF engine "
                    "against vLLM's default, for the ratio's interval (needs vLLM)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    model, tok = load_model(args.model)
    on_gpu = model.device.type == "cuda"
    big = args.batch_size or (128 if on_gpu else 64)
    prompts = [r["messages"][:1] for r in split_rows("train", 0, {"train": args.prompts})]
    results = {}

    def timed(name, fn):
        if on_gpu:
            torch.cuda.synchronize()
        t = time.perf_counter()
        texts, n = fn()
        if on_gpu:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        results[name] = {"seconds": dt, "tokens": n, "tokens_per_s": n / dt, "texts": texts}
        print(f"{name:<22} {dt:8.1f} s {n:8d} tokens {n / dt:9.1f} tok/s", flush=True)

    def ours(bs):
        gens = generate(model, tok, prompts, SamplingSettings(args.max_new_tokens, batch_size=bs),
                        desc=f"selfplay batch {bs}")
        return [g.text for g in gens], sum(g.n_tokens for g in gens)

    device = torch.cuda.get_device_name(0) if on_gpu else \
        f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    print(f"{args.prompts} task-suite prompts, max_new_tokens {args.max_new_tokens}, greedy, "
          f"{model.dtype}, {device}\n")
    if args.rounds:
        return rounds(args, model, tok, prompts, big, ours, device)
    greedy_ways = not (args.samples and args.sampling_only)
    if greedy_ways:
        timed("official (batch 16)", lambda: official(model, tok, prompts, args.max_new_tokens))
        timed("selfplay (batch 16)", lambda: ours(16))
        timed(f"selfplay (batch {big})", lambda: ours(big))

    sampled = SamplingSettings(args.max_new_tokens, temperature=0.7, top_p=0.9, batch_size=big)

    k_ = args.samples
    seeds = [[stream_seed(sampled.seed, str(k), i) for i in range(len(prompts))]
             for k in range(k_)]

    def ours_passes():       # before: one pass per sample, each waiting on its longest answer
        gens = [g for k in range(k_)
                for g in generate(model, tok, prompts, sampled, seeds[k],
                                  desc=f"selfplay sample {k + 1}/{k_}")]
        return [g.text for g in gens], sum(g.n_tokens for g in gens)

    def ours_one_pass():     # `selfplay generate`: the K copies of a prompt decoded together
        gens = generate(model, tok, [p for p in prompts for _ in range(k_)], sampled,
                        [seeds[k][i] for i in range(len(prompts)) for k in range(k_)],
                        desc=f"selfplay K={k_} in one pass")
        return [g.text for k in range(k_) for g in gens[k::k_]], sum(g.n_tokens for g in gens)

    if args.samples:
        timed(f"selfplay K={k_}, K passes", ours_passes)
        timed(f"selfplay K={k_}, one pass", ours_one_pass)
        same = results[f"selfplay K={k_}, K passes"].get("texts") == \
            results[f"selfplay K={k_}, one pass"].get("texts")
        print(f"{'':<22} (same samples in both: {same})")
    if vllm_installed() and not args.no_vllm:
        from selfplay.engines.vllm import VllmEngine
        own = str(model.dtype)[6:]
        ways = [(d, "auto", True) for d in dict.fromkeys([own, "bfloat16"] if greedy_ways
                                                          else [own])]
        if greedy_ways and not on_gpu:          # on a GPU, auto compiles already
            ways += [(own, "true", True), (own, "auto", False)]
        for dtype, compiled, tcmalloc in ways:
            os.environ["SELFPLAY_TCMALLOC"] = "1" if tcmalloc else "0"
            t = time.perf_counter()
            engine = VllmEngine(args.model, str(model.device.type), dtype, compile=compiled)
            start = time.perf_counter() - t
            name = f"vllm {dtype}" + (" compiled" if compiled == "true" else "") + \
                ("" if tcmalloc else " no tcmalloc")

            def vllm(settings, passes=1, engine=engine):
                gens = [g for k in range(passes)
                        for g in engine.generate(prompts, settings, seeds[k] if k_ else None,
                                                 desc="vllm")]
                return [g.text for g in gens], sum(g.n_tokens for g in gens)

            print(f"{'':<22} (vLLM engine start {start:.0f} s, not counted)")
            if greedy_ways:
                timed(name, lambda: vllm(SamplingSettings(args.max_new_tokens)))
                results[name].update(engine_start_s=start, allocator=engine.allocator)
            if args.samples and dtype == own and compiled == "auto":
                timed(f"vllm {dtype} K={args.samples}", lambda: vllm(sampled, args.samples))
                results[f"vllm {dtype} K={args.samples}"]["engine_start_s"] = start
            engine.close()

    base = results.get("official (batch 16)")
    hf = results.get(f"selfplay (batch {big})")
    print(f"\n{'':<22} {'tok/s':>9} {'vs official':>12} {'vs HF engine':>13} {'same text':>10}")
    for name, r in results.items():
        greedy = "K=" not in name
        same = sum(a == b for a, b in zip(r["texts"], base["texts"])) if greedy else None
        vs = hf if greedy else results[f"selfplay K={args.samples}, K passes"]
        r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"] if greedy else None
        r["vs_hf_engine"] = r["tokens_per_s"] / vs["tokens_per_s"]
        r["same_as_official"] = same
        print(f"{name:<22} {r['tokens_per_s']:>9.1f} "
              + (f"{r['speedup']:>11.2f}x " if greedy else f"{'–':>12} ")
              + f"{r['vs_hf_engine']:>12.2f}x "
              + (f"{same:>5}/{len(prompts)}" if greedy else "    (sampled)"))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": device, "args": vars(args),
                       "results": {k: {kk: vv for kk, vv in v.items() if kk != "texts"}
                                   for k, v in results.items()}}, fh, indent=2)


def rounds(args, model, tok, prompts, big, ours, device) -> None:
    """Our HF engine against vLLM's default, in paired rounds of alternating order."""
    if not vllm_installed():
        raise SystemExit("--rounds compares against vLLM, which is not installed here")
    from selfplay.engines.vllm import VllmEngine
    greedy = SamplingSettings(args.max_new_tokens)

    def hf():
        t = time.perf_counter()
        texts, n = ours(big)
        return texts, n / (time.perf_counter() - t)

    def vllm():
        engine = VllmEngine(args.model, str(model.device.type), str(model.dtype)[6:])
        t = time.perf_counter()
        gens = engine.generate(prompts, greedy, desc="vllm")
        rate = sum(g.n_tokens for g in gens) / (time.perf_counter() - t)
        engine.close()
        return [g.text for g in gens], rate

    table = []
    for r in range(args.rounds):
        order = (("hf", hf), ("vllm", vllm)) if r % 2 == 0 else (("vllm", vllm), ("hf", hf))
        got = {name: fn() for name, fn in order}
        same = sum(a == b for a, b in zip(got["hf"][0], got["vllm"][0]))
        row = {"order": [name for name, _ in order], "hf_tokens_per_s": got["hf"][1],
               "vllm_tokens_per_s": got["vllm"][1], "ratio": got["vllm"][1] / got["hf"][1],
               "same_text": same}
        table.append(row)
        print(f"round {r + 1} ({' then '.join(row['order'])}): HF engine "
              f"{row['hf_tokens_per_s']:.1f} tok/s, vLLM {row['vllm_tokens_per_s']:.1f} tok/s, "
              f"{row['ratio']:.2f}x, same text {same}/{len(prompts)}", flush=True)
    gm, lo, hi = ratio_interval([row["ratio"] for row in table])
    print(f"\nvLLM / HF engine over {args.rounds} paired rounds: {gm:.2f}x "
          f"(95% interval {lo:.2f}x to {hi:.2f}x; rounds {min(r['ratio'] for r in table):.2f}x "
          f"to {max(r['ratio'] for r in table):.2f}x)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": device, "args": vars(args), "rounds": table,
                       "ratio_geomean": gm, "ratio_95_interval": [lo, hi]}, fh, indent=2)


if __name__ == "__main__":
    main()
