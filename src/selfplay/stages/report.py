"""`selfplay report RUN_DIR`: a markdown page with a table per iteration, and PNG plots."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

from selfplay.config import RANKED_METHODS
from selfplay.data.evaluations import Evaluation
from selfplay.data.pairs import ConvertReport, SplitReport
from selfplay.data.run_paths import RunPaths
from selfplay.errors import SelfplayError
from selfplay.io import read_jsonl, writable_dir
from selfplay.manifest import read_manifest
from selfplay.selection import read_selection
from selfplay.stats import PairedChange, paired_change

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless back end)


@dataclass
class ModelRow:
    """One model of a run: its evaluation, its training log, and the pairs it trained on."""
    name: str
    eval: Evaluation
    train: list[dict] = field(default_factory=list)
    pairs: SplitReport | None = None


def load_models(paths: RunPaths) -> list[ModelRow]:
    """One entry per model: θ_start, then θ_{t+1} of each finished iteration t."""
    require_run(paths)
    models = [ModelRow("start", Evaluation.read(paths.base_eval))]
    s = paths.sft
    if s.eval.exists():
        models.append(ModelRow("SFT", Evaluation.read(s.eval), _train_log(s.model.log)))
    for t in paths.iterations():
        it = paths.iteration(t)
        if not it.eval.exists():
            continue
        conv = it.convert_report
        models.append(ModelRow(
            f"iteration {t}", Evaluation.read(it.eval), _train_log(it.model.log),
            ConvertReport.read(conv).splits.get("train") if conv.exists() else None))
    return models


def require_run(paths: RunPaths) -> None:
    if not paths.base_eval.exists():
        raise SelfplayError(f"{paths.root} holds no evaluation yet (base/eval.json); is it a "
                            "run directory of `selfplay run`?")


def _train_log(log: Path) -> list[dict]:
    return read_jsonl(log) if log.exists() else []


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _num(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def accuracy_band(models: list[ModelRow]) -> tuple[list[float], list[float], list[float]]:
    """Accuracy, and the low and high ends of its 95% interval, in percent, per model (an
    evaluation without an interval gives a band of zero width)."""
    acc = [100 * (m.eval.accuracy or 0) for m in models]
    ci = [m.eval.accuracy_ci95 or [a / 100] * 2 for m, a in zip(models, acc)]
    return acc, [100 * c[0] for c in ci], [100 * c[1] for c in ci]


def accuracy_cell(e: Evaluation) -> str:
    """`21.0% (15.9–27.2)`: the accuracy and its 95% Wilson interval."""
    if e.accuracy is None:
        return "–"
    ci = e.accuracy_ci95
    return _pct(e.accuracy) + (f" ({100 * ci[0]:.1f}–{100 * ci[1]:.1f})" if ci else "")


def change_cell(p: PairedChange | None) -> str:
    """`+3.5 pts (27↑ 16↓, p = 0.13)`: a paired change on the same prompts, sign test."""
    if not p or not p.n:     # no prompt checkable (a dataset without answers): no test
        return "–"
    return f"{100 * p.delta:+.1f} pts ({p.gained}↑ {p.lost}↓, p = {p.p_value:.2g})"


def table(models: list[ModelRow]) -> str:
    head = ("| model | accuracy (95% CI) | change vs previous (sign test) | win rate vs previous "
            "| ref. log-lik/token | response tokens | cut by limit | final loss | reward margin "
            "| reward accuracy |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for m in models:
        e, tr = m.eval, (m.train[-1] if m.train else {})
        train = (f"| {tr['loss']:.4f} | {tr['rewards/margins']:.3f} "
                 f"| {_pct(tr['rewards/accuracies'])} |") if "rewards/margins" in tr else \
            (f"| {tr['loss']:.4f} | – | – |" if tr else "| – | – | – |")
        lines.append(
            f"| {m.name} | {accuracy_cell(e)} | {change_cell(e.paired)} "
            f"| {_pct(e.win_rate)} | {_num(e.reference_logp_per_token)} "
            f"| {e.mean_response_tokens:.1f} | {_pct(e.truncated_share)} " + train)
    return "\n".join(lines)


def start_to_last(models: list[ModelRow]) -> str:
    """The paired test from the first model to the last on the same prompts, and with an SFT
    stage also from the SFT model (θ_0, where the self-play iterations start)."""
    last = models[-1]
    froms = [m for m in models[:-1] if m.name in ("start", "SFT")]
    lines = []
    for first in froms:
        if first.eval.rows is None or last.eval.rows is None:
            continue
        p = paired_change(last.eval.correct(), first.eval.correct())
        if not p.n:              # nothing checkable: a "+0.0 pts" line would claim a test
            continue
        lines.append(f"From {first.name} to {last.name}: {change_cell(p)} on the same "
                     f"{p.n} prompts.")
    return "\n\n".join(lines)


def family_table(models: list[ModelRow]) -> str:
    fams = sorted({f for m in models for f in m.eval.per_family})
    if not fams:
        return ""
    lines = ["| family | " + " | ".join(m.name for m in models) + " |",
             "|---|" + "---|" * len(models)]
    for f in fams:
        lines.append(f"| {f} | " + " | ".join(
            _pct(m.eval.per_family[f].accuracy if f in m.eval.per_family else None)
            for m in models) + " |")
    return "\n".join(lines)


def pairs_table(models: list[ModelRow]) -> str:
    """What each iteration trained on: prompts, pairs, and for SPPO the judge's win rates."""
    rows = [m for m in models if m.pairs is not None]
    if not rows:
        return ""
    sppo = rows[0].pairs.mean_chosen_probs_win is not None
    loser = "rejected" if sppo else "generated"
    head = f"| iteration | prompts | pairs | {loser} answer cut by limit |"
    if sppo:
        head += (" all-tie prompts left out | mean P̂(chosen ≻ π_t) "
                 "| mean P̂(rejected ≻ π_t) |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for m in rows:
        p = m.pairs
        line = f"| {m.name} | {p.prompts} | {p.pairs} | {_pct(p.truncated_share)} |"
        if sppo:
            line += (f" {p.all_tie_prompts_left_out} | {p.mean_chosen_probs_win:.3f} "
                     f"| {p.mean_chosen_probs_lose:.3f} |")
        lines.append(line)
    return "\n".join(lines)


def lm_eval_scores(models: list[ModelRow]) -> list[tuple[str, str]]:
    """(task, metric) of every lm-eval score in the run, stderr columns aside."""
    return sorted({(t, k) for m in models for t, ms in (m.eval.lm_eval or {})
                   .get("tasks", {}).items() for k in ms if "_stderr" not in k})


def _lm_eval_value(m: ModelRow, task: str, metric: str) -> tuple[float | None, float | None]:
    ms = (m.eval.lm_eval or {}).get("tasks", {}).get(task, {})
    return ms.get(metric), ms.get(metric.replace(",", "_stderr,", 1) if "," in metric
                                  else f"{metric}_stderr")


def lm_eval_table(models: list[ModelRow]) -> str:
    """Each model's lm-eval scores, ± their standard errors."""
    cols = lm_eval_scores(models)
    if not cols:
        return ""
    lines = ["| model | " + " | ".join(f"{t} {k}" for t, k in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for m in models:
        cells = []
        for t, k in cols:
            v, se = _lm_eval_value(m, t, k)
            cells.append("–" if v is None else f"{v:.4f}" + (f" ± {se:.4f}" if se else ""))
        lines.append(f"| {m.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plots(models: list[ModelRow], out: Path, method: str = "spin") -> list[Path]:
    """iterations.png, and training.png and lm_eval.png where there is something to draw."""
    out.mkdir(parents=True, exist_ok=True)
    drawn = [_iterations_plot(models, out / "iterations.png"),
             _training_plot(models, out / "training.png", method),
             _lm_eval_plot(models, out / "lm_eval.png")]
    return [p for p in drawn if p is not None]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _points(models: list[ModelRow], key: str, scale: float = 1.0) -> list[tuple[int, float]]:
    """(model index, value) of an evaluation measure, where it was measured."""
    return [(i, scale * getattr(m.eval, key)) for i, m in enumerate(models)
            if getattr(m.eval, key) is not None]


def _iterations_plot(models: list[ModelRow], path: Path) -> Path:
    """Accuracy with its interval and the win rates per model; without a checker, the
    reference likelihood instead."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    xs = list(range(len(models)))
    checked = any(m.eval.accuracy is not None for m in models)
    if checked:
        acc, lo, hi = accuracy_band(models)
        ax.errorbar(xs, acc, yerr=[[max(0.0, a - x) for a, x in zip(acc, lo)],
                                   [max(0.0, x - a) for a, x in zip(acc, hi)]],
                    fmt="o-", capsize=3, label="task accuracy (held-out), 95% CI")
    wr, jw = _points(models, "win_rate", 100), _points(models, "judge_win_rate", 100)
    if wr:
        ax.plot([i for i, _ in wr], [w for _, w in wr], "s--", label="win rate vs previous")
    if jw:
        ax.plot([i for i, _ in jw], [w for _, w in jw], "^:", label="judge's win rate vs previous")
    ax.set_xticks(xs, [m.name for m in models])
    ax.set_title("Accuracy and win rate per iteration")
    ll = _points(models, "reference_logp_per_token")
    if not checked and ll:  # no checker (UltraChat): an accuracy line would read 0%; plot what
        ll_ax = ax.twinx() if (wr or jw) else ax                       # was measured instead
        ll_ax.plot([i for i, _ in ll], [v for _, v in ll], "o-", color="C3",
                   label="reference log-lik/token (held-out)")
        ll_ax.set_ylabel("nats per token")
        ax.set_title("Reference likelihood" + (" and win rate" if wr or jw else "")
                     + " per iteration")
        if ll_ax is not ax:
            ll_ax.legend(loc="lower right")
    if checked or wr or jw:
        ax.set_ylabel("%")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:     # nothing measured at all draws no legend
        ax.legend()
    return _save(fig, path)


def _training_plot(models: list[ModelRow], path: Path, method: str) -> Path | None:
    """Loss, reward margin and reward accuracy over the updates of every training."""
    trained = [m for m in models if m.train]
    if not trained:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    offset = 0
    for m in trained:
        steps = [offset + r["step"] for r in m.train]
        for ax, key in zip(axes, ("loss", "rewards/margins", "rewards/accuracies")):
            pts = [(x, r[key]) for x, r in zip(steps, m.train) if key in r]  # SFT: loss only
            if pts:
                ax.plot(*zip(*pts), "o-", ms=3, label=m.name)
        offset = steps[-1]
        for ax in axes:
            ax.axvline(offset, color="grey", lw=0.5)
    margin = "chosen − rejected" if method in RANKED_METHODS else "real − generated"
    for ax, title in zip(axes, ("loss", f"reward margin ({margin})", "reward accuracy")):
        ax.set_title(title)
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
    axes[0].legend()
    return _save(fig, path)


def _lm_eval_plot(models: list[ModelRow], path: Path) -> Path | None:
    """Each lm-eval score per model, with its 95% interval from the standard error."""
    cols = lm_eval_scores(models)
    if not cols:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for t, k in cols:
        pts = [(i, *_lm_eval_value(m, t, k)) for i, m in enumerate(models)]
        pts = [(i, v, se or 0.0) for i, v, se in pts if v is not None]
        ax.errorbar([i for i, _, _ in pts], [v for _, v, _ in pts],
                    yerr=[1.96 * se for _, _, se in pts], fmt="o-", capsize=3,
                    label=f"{t} {k}")
    ax.set_xticks(range(len(models)), [m.name for m in models])
    ax.set_title("lm-evaluation-harness per model (95% CI from its standard error)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def evaluated_on(models: list[ModelRow], recipe: dict) -> str:
    """What the evaluations read, said plainly where it is the split the run trains on."""
    split, trains_on = models[0].eval.split or "", recipe.get("split")
    if split.endswith("(held out)"):
        return (f"evaluated greedily on the prompts held out of the {split.split()[0]} split "
                "by their id hashes (the dataset has no test split; training never reads them)")
    if split and split == trains_on:
        return (f"evaluated greedily on the {split} split, which the iterations also train on "
                "(--eval_split or --holdout_size would hold prompts out)")
    return f"evaluated greedily on the held-out split ({split or '?'})"


def selection_section(paths: RunPaths) -> list[str]:
    """--select_on: which model was chosen on validation and why, then θ_0 and it on the test
    split, read once."""
    sel = read_selection(paths.selection)
    if sel is None:
        return []
    lines = ["## The best model, chosen on validation", "",
             f"Chosen: **{sel['best']}** (`best/`). {sel['reason']}"
             + (f" The run stopped early: {sel['patience']} iteration(s) in a row without a "
                "gain (--patience)." if sel["stopped_early"] else ""), ""]
    rows = [ModelRow(f"θ_0 ({sel['verdicts'][0]['name']})",
                     Evaluation.read(paths.theta0_test_eval))]
    if paths.best_test_eval.exists():
        rows.append(ModelRow(f"best ({sel['best']})", Evaluation.read(paths.best_test_eval)))
    split = rows[0].eval.split or "test"
    lines += [f"On the {split} split, read once for these models alone (the change is paired "
              "against θ_0 on the same prompts):", "", table(rows), ""]
    return lines


def write_report(run_dir: str | Path) -> str:
    """Write RUN_DIR/report.md and RUN_DIR/plots/*.png; return the iteration table."""
    paths = RunPaths(Path(run_dir))
    require_run(paths)
    writable_dir(paths.root, "RUN_DIR")            # checked before anything is read or drawn
    writable_dir(paths.plots, "RUN_DIR/plots")
    models = load_models(paths)
    manifest = read_manifest(paths.manifest) if paths.manifest.exists() else {}
    recipe = manifest.get("recipe", {})
    pngs = plots(models, paths.plots, recipe.get("method", "spin"))
    t = table(models)
    body = [f"# selfplay run: {paths.root.name}", "",
            f"Method **{recipe.get('method', '?')}**, model `{recipe.get('model_name_or_path')}`, "
            f"dataset `{recipe.get('dataset')}`, "
            f"{sum(m.name.startswith('iteration') for m in models)} iteration(s) finished. "
            f"Each row is the model after that iteration, {evaluated_on(models, recipe)}; "
            "the win rate is against the previous row's model on the same prompts "
            "(right beats wrong, equal counts half); the training columns are the last logged "
            "values of that iteration. Accuracy comes with its 95% Wilson interval; a change is "
            "paired on the same prompts (↑ gained, ↓ lost) with an exact sign test.", "", t, "",
            start_to_last(models), ""]
    judged = [m for m in models if m.eval.judge_win_rate is not None]
    if judged:
        body += [f"Judge ({judged[0].eval.judge}) win rate of each iteration's model "
                 "against the previous one on the held-out prompts: "
                 + ", ".join(f"{m.name} {_pct(m.eval.judge_win_rate)}" for m in judged)
                 + ".", ""]
    body += selection_section(paths)
    pt = pairs_table(models)
    if pt:
        body += ["## Training pairs per iteration", "", pt, ""]
    ft = family_table(models)
    if ft:                          # none without a checker (UltraChat): no empty section
        body += ["## Accuracy per task family", "", ft, ""]
    lt = lm_eval_table(models)
    if lt:
        body += ["## lm-evaluation-harness", "", "Each model's scores (± standard error) on "
                 "the tasks of `--lm_eval_tasks`, as lm-eval computes them.", "", lt, ""]
    body += [f"![{p.stem}](plots/{p.name})" for p in pngs]
    stages = manifest.get("stages", {})
    if stages:
        body += ["", "## Stages", "", "| stage | state | seconds |", "|---|---|---|"]
        body += [f"| {k} | {v['state']} | {v.get('seconds', '–')} |" for k, v in stages.items()]
    paths.report.write_text("\n".join(body) + "\n")
    return t
