"""`selfplay compare RUN_DIR RUN_DIR ... --output_dir OUT`: arms of an experiment side by side.

Each run directory is one arm (SPIN, the SFT control arm, SPPO, ...). The arms are lined up
at θ_0, the model their iteration 0 starts from (the SFT model when there is an SFT stage),
then iteration by iteration; the page shows each arm's accuracy with its
95% interval, and at each step the paired difference between the first arm and each other
one on the same held-out prompts, with an exact sign test. One plot draws every arm with
its confidence band.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt

from selfplay.data.run_paths import RunPaths
from selfplay.errors import SelfplayError
from selfplay.stages.report import ModelRow, accuracy_band, accuracy_cell, change_cell, load_models
from selfplay.stats import paired_change


def arm_names(runs: list[RunPaths]) -> list[str]:
    """`DIR (method)` for each run; where two share a directory name, as much of their paths
    as tells them apart (`a/base`, `b/base`)."""
    def method(paths: RunPaths) -> str:
        try:
            return json.loads(paths.manifest.read_text()).get("recipe", {}).get("method", "?")
        except (OSError, ValueError, AttributeError):
            return "?"

    parts = [Path(p.root).resolve().parts for p in runs]
    if len(set(parts)) < len(parts):
        raise SelfplayError("compare got the same run directory twice.")
    depth = 1
    while len({q[-depth:] for q in parts}) < len(parts):
        depth += 1
    return [f"{'/'.join(q[-depth:])} ({method(p)})" for q, p in zip(parts, runs)]


def same_prompts(arms: dict[str, list[ModelRow]]) -> None:
    """Every evaluation of every arm on one list of held-out prompts, or one sentence: a
    paired test matches prompts by id, never by position."""
    names = list(arms)
    want = arms[names[0]][0].eval.prompt_ids()
    for name, models in arms.items():
        for m in models:
            if m.eval.prompt_ids() != want:
                raise SelfplayError(
                    f"arm {name} ({m.name}) was evaluated on other prompts than arm "
                    f"{names[0]} (another dataset, split, size or seed): paired tests need "
                    "the same prompts; compare arms evaluated on the same held-out split.")


def aligned(models: list[ModelRow]) -> list[ModelRow]:
    """θ_0 (the model iteration 0 starts from: the SFT model, or the start when there was no
    SFT stage), then each iteration's model. Arms line up there: an SFT control arm started
    from another run's SFT model (`--model RUN/sft/model --sft_epochs 0`) has the same θ_0."""
    first = next((i for i, m in enumerate(models) if m.name.startswith("iteration")),
                 len(models))
    return models[max(first - 1, 0):]


def compare(run_dirs: list[Path], out_dir: Path) -> str:
    """Write OUT/compare.md and OUT/compare.png; return the table."""
    if len(run_dirs) < 2:
        raise SelfplayError("compare needs at least two run directories.")
    runs = [RunPaths(Path(d)) for d in run_dirs]
    names = arm_names(runs)
    arms = {n: aligned(load_models(p)) for n, p in zip(names, runs)}
    same_prompts(arms)
    steps = max(len(models) for models in arms.values())
    first = arms[names[0]]
    head = "| step | " + " | ".join(names) + " | " + " | ".join(
        f"{n} − {names[0]}" for n in names[1:]) + " |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for i in range(steps):
        row = ["θ_0" if i == 0 else next((m[i].name for m in arms.values() if i < len(m)))]
        row += [accuracy_cell(m[i].eval) if i < len(m) else "–" for m in arms.values()]
        for n in names[1:]:
            other = arms[n]
            row.append(change_cell(paired_change(other[i].eval.correct(),
                                                 first[i].eval.correct()))
                       if i < len(other) and i < len(first) else "–")
        lines.append("| " + " | ".join(row) + " |")
    table = "\n".join(lines)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for n, models in arms.items():
        xs = list(range(len(models)))
        acc, lo, hi = accuracy_band(models)
        ax.plot(xs, acc, "o-", label=n)
        ax.fill_between(xs, lo, hi, alpha=0.2)
    longest = max(arms.values(), key=len)
    ax.set_xticks(range(len(longest)), ["θ_0"] + [m.name for m in longest[1:]])
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("Accuracy per step, 95% confidence bands")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "compare.png", dpi=120)
    plt.close(fig)
    body = ["# Arms compared", "",
            "Each column is one run; each row a step of it, evaluated greedily on the same "
            "held-out prompts. Accuracy with its 95% Wilson interval; the difference columns "
            "pair each arm with the first on the same prompts (↑ the arm right where the first "
            "was wrong, ↓ the reverse), with an exact sign test.", "", table, "",
            "![compare](compare.png)", ""]
    body += [f"- {n}: `{lay.root}`; θ_0 is its {arms[n][0].name} model"
             for n, lay in zip(names, runs)]
    (out_dir / "compare.md").write_text("\n".join(body) + "\n")
    return table
