"""Print the markdown tables of docs/benchmarks.md from the JSON the bench scripts write.

    python bench/tables.py bench/results/generation_vllm_cpu.json bench/results/training_cpu.json
"""

import json
import sys


def generation(d: dict) -> str:
    a = d["args"]
    how = f"{a['samples']} samples each (temperature 0.7, top_p 0.9)" if a.get("samples") \
        and a.get("sampling_only") else "greedy"
    lines = [(f"{a['prompts']} task-suite prompts, max_new_tokens {a['max_new_tokens']}, {how}; "
              f"{d['device']}."), "",
             ("| way | seconds | tokens | tokens/s | vs official | vs HF engine "
              "| same text as official |"), "|---|---|---|---|---|---|---|"]
    for name, r in d["results"].items():
        same = "sampled" if r["same_as_official"] is None else \
            f"{r['same_as_official']}/{a['prompts']}"
        start = f" (+{r['engine_start_s']:.0f} s start)" if "engine_start_s" in r else ""
        vs_hf = f"{r['vs_hf_engine']:.2f}x" if "vs_hf_engine" in r else "–"
        vs_official = "–" if r.get("speedup") is None else f"{r['speedup']:.2f}x"
        lines.append(f"| {name} | {r['seconds']:.1f}{start} | {r['tokens']} "
                     f"| {r['tokens_per_s']:.1f} | {vs_official} | {vs_hf} | {same} |")
    return "\n".join(lines)


def generation_rounds(d: dict) -> str:
    a = d["args"]
    lines = [f"{a['prompts']} task-suite prompts, max_new_tokens {a['max_new_tokens']}, greedy, "
             f"{len(d['rounds'])} paired rounds; {d['device']}.", "",
             ("| round | order | HF engine tokens/s | vLLM tokens/s | vLLM / HF "
              "| same text in both |"),
             "|---|---|---|---|---|---|"]
    for i, r in enumerate(d["rounds"], 1):
        lines.append(f"| {i} | {' then '.join(r['order'])} | {r['hf_tokens_per_s']:.1f} "
                     f"| {r['vllm_tokens_per_s']:.1f} | {r['ratio']:.2f}x "
                     f"| {r['same_text']}/{a['prompts']} |")
    lo, hi = d["ratio_95_interval"]
    lines.append(f"| geometric mean | | | | **{d['ratio_geomean']:.2f}x** "
                 f"(95% interval {lo:.2f}x to {hi:.2f}x) | |")
    return "\n".join(lines)


def training(d: dict) -> str:
    a = d["args"]
    by = {r["name"]: r for r in d["results"]}
    gc = ", gradient checkpointing" if a.get("gradient_checkpointing") else ""
    lines = [f"{a['pairs']} pairs, batch {a['batch']}, one epoch{gc}; memory: "
             f"{d['results'][0]['memory']}.", "",
             "| trainer | loop seconds | tokens/s | vs trl | vs trl+precompute | peak MB "
             "| vs trl | vs trl+precompute |", "|---|---|---|---|---|---|---|---|"]
    for r in d["results"]:
        lines.append(
            f"| {r['name']} | {r['loop_s']:.1f} | {r['tokens_per_s']:.1f} "
            f"| {r['tokens_per_s'] / by['trl']['tokens_per_s']:.2f}x "
            f"| {r['tokens_per_s'] / by['trl+precompute']['tokens_per_s']:.2f}x "
            f"| {r['peak_mb']:.0f} | {r['peak_mb'] / by['trl']['peak_mb']:.2f}x "
            f"| {r['peak_mb'] / by['trl+precompute']['peak_mb']:.2f}x |")
    return "\n".join(lines)


def precision(d: dict) -> str:
    best = {p: v[0] | {k: min(r[k] for r in v) for k in ("train_loop_s", "decode_s")}
            for p, v in d["runs"].items()}
    f, b = best["float32"], best["bf16"]
    tok_s = {p: x["decode_tokens"] / x["decode_s"] for p, x in best.items()}
    return "\n".join([
        f"{d['pairs']} pairs (batch 8, one epoch), {d['prompts']} prompts decoded greedily; best "
        f"of {d['repeats']} runs each.", "",
        "| precision | train loop seconds | decode tokens/s |", "|---|---|---|",
        f"| float32 | {f['train_loop_s']:.1f} | {tok_s['float32']:.1f} |",
        f"| bf16 (autocast) | {b['train_loop_s']:.1f} | {tok_s['bf16']:.1f} |",
        f"| bf16 / float32 | {f['train_loop_s'] / b['train_loop_s']:.2f}x faster "
        f"| {tok_s['bf16'] / tok_s['float32']:.2f}x |", "",
        f"Greedy answers bf16 leaves unchanged: {d['same_answers']} of {d['prompts']}."])


def pairrm(d: dict) -> str:
    lines = [f"{d['prompts']} prompts x K = {d['k']}: {d['comparisons']} ordered comparisons of "
             f"{d['tokens_per_comparison']:.0f} tokens on average (samples of "
             f"{d['sample_tokens']:.0f} tokens); {d.get('device', 'cpu')}, {d['threads']} "
             "threads.", "",
             "| dtype | seconds | comparisons/s | tokens/s |", "|---|---|---|---|"]
    for name, r in d["results"].items():
        lines.append(f"| {name} | {r['seconds']:.1f} | {r['pairs_per_s']:.2f} "
                     f"| {r['tokens_per_s']:.0f} |")
    return "\n".join(lines)


def table(d: dict) -> str | None:
    if d.get("bench") == "precision":
        return precision(d)
    if d.get("bench") == "pairrm":
        return pairrm(d)
    if "rounds" in d:
        return generation_rounds(d)
    if "args" not in d:
        return None          # bench_scale, bench_vllm_scoring: docs quote their own output
    return generation(d) if "device" in d and "prompts" in d["args"] else training(d)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        t = table(json.load(open(path)))
        print(f"{path}: no table (its bench script prints its own)" if t is None else t)
        print()
