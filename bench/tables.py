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


if __name__ == "__main__":
    for path in sys.argv[1:]:
        d = json.load(open(path))
        print(generation(d) if "device" in d and "prompts" in d["args"] else training(d))
        print()
