"""`selfplay compare RUN_DIR RUN_DIR ... --output_dir OUT`: arms of an experiment side by side.

Each run directory is one arm (SPIN, the SFT control arm, SPPO, iterative DPO, ...). The
arms are lined up at θ_0, the model their iteration 0 starts from (the SFT model when there
is an SFT stage), then iteration by iteration; the page shows each arm's accuracy with its
95% interval, and at each step the paired difference between each arm and the reference arm
(the SFT control arm, `--method sft`, where there is one; else the first) on the same
held-out prompts, with an exact sign test; then each arm's updates and time. Arms run with
`--select_on validation` also get their chosen model read on test, against θ_0 and against
the reference arm's chosen model. One plot draws every arm with its confidence band.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt

from selfplay.data.evaluations import Evaluation
from selfplay.data.run_paths import RunPaths
from selfplay.errors import SelfplayError
from selfplay.stages.report import ModelRow, accuracy_band, accuracy_cell, change_cell, load_models
from selfplay.selection import read_selection
from selfplay.stats import paired_change


def _manifest(paths: RunPaths) -> dict:
    try:
        m = json.loads(paths.manifest.read_text())
        return m if isinstance(m, dict) else {}
    except (OSError, ValueError):
        return {}


def method(paths: RunPaths) -> str:
    return (_manifest(paths).get("recipe") or {}).get("method", "?")


def arm_names(runs: list[RunPaths]) -> list[str]:
    """`DIR (method)` for each run; where two share a directory name, as much of their paths
    as tells them apart (`a/base`, `b/base`)."""
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
    ref = next((n for n, p in zip(names, runs) if method(p) == "sft"), names[0])
    others = [n for n in names if n != ref]
    steps = max(len(models) for models in arms.values())
    first = arms[ref]
    head = "| step | " + " | ".join(names) + " | " + " | ".join(
        f"{n} − {ref}" for n in others) + " |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for i in range(steps):
        row = ["θ_0" if i == 0 else next((m[i].name for m in arms.values() if i < len(m)))]
        row += [accuracy_cell(m[i].eval) if i < len(m) else "–" for m in arms.values()]
        for n in others:
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
    ax.set_ylabel(f"{arms[ref][0].eval.split or 'held-out'} accuracy (%)")
    ax.set_title("Accuracy per step, 95% confidence bands")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "compare.png", dpi=120)
    plt.close(fig)
    split = arms[ref][0].eval.split or "held-out"
    body = ["# Arms compared", "",
            f"Each column is one run; each row a step of it, evaluated greedily on the same "
            f"{split} prompts. Accuracy with its 95% Wilson interval; the difference columns "
            f"pair each arm with {ref} on the same prompts (↑ the arm right where {ref} was "
            "wrong, ↓ the reverse), with an exact sign test.", "", table, "",
            "![compare](compare.png)", "", cost_table(names, runs), ""]
    chosen = chosen_table(names, runs, ref)
    if chosen:
        body += ["## Each arm's model chosen on validation, read once on test", "", chosen, ""]
    body += [f"- {n}: `{lay.root}`; θ_0 is its {arms[n][0].name} model"
             for n, lay in zip(names, runs)]
    (out_dir / "compare.md").write_text("\n".join(body) + "\n")
    return table


def cost_table(names: list[str], runs: list[RunPaths]) -> str:
    """Each arm's optimizer updates per iteration (arms compared at equal updates should
    match) and its stage time."""
    lines = ["| arm | updates per iteration | stage time |", "|---|---|---|"]
    for n, p in zip(names, runs):
        steps = []
        for t in p.iterations():
            done = p.iteration(t).model.complete
            try:
                steps.append(str(json.loads(done.read_text())["steps"]))
            except (OSError, ValueError, KeyError, TypeError):
                steps.append("–")
        secs = sum(float(s.get("seconds") or 0) for s in
                   (_manifest(p).get("stages") or {}).values())
        lines.append(f"| {n} | {', '.join(steps) or '–'} | {secs / 60:.1f} min |")
    return "\n".join(lines)


def chosen_table(names: list[str], runs: list[RunPaths], ref: str) -> str:
    """--select_on arms: θ_0 and the chosen model on test, and the chosen model against the
    reference arm's, paired on the same test prompts."""
    picked = {}
    for n, p in zip(names, runs):
        sel = read_selection(p.selection)
        if sel is not None:
            theta0 = Evaluation.read(p.theta0_test_eval)
            best = Evaluation.read(p.best_test_eval) if p.best_test_eval.exists() else theta0
            picked[n] = (sel["best"], theta0, best)
    if not picked:
        return ""
    base = picked.get(ref)
    lines = [f"| arm | chosen | θ_0 on test | chosen on test | chosen − θ_0 | chosen − {ref}'s |",
             "|---|---|---|---|---|---|"]
    for n, (name, theta0, best) in picked.items():
        vs_ref = "–" if base is None or n == ref or best.prompt_ids() != base[2].prompt_ids() \
            else change_cell(paired_change(best.correct(), base[2].correct()))
        lines.append(f"| {n} | {name} | {accuracy_cell(theta0)} | {accuracy_cell(best)} "
                     f"| {change_cell(paired_change(best.correct(), theta0.correct()))} "
                     f"| {vs_ref} |")
    return "\n".join(lines)
