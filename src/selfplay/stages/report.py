"""`selfplay report RUN_DIR`: a markdown page with a table per iteration, and PNG plots."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

from selfplay.data.pairs import ConvertReport, SplitReport
from selfplay.data.run_layout import RunLayout
from selfplay.errors import SelfplayError

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless back end)


@dataclass
class ModelRow:
    """One model of a run: its evaluation, its training log, and the pairs it trained on."""
    name: str
    eval: dict
    train: list[dict] = field(default_factory=list)
    pairs: SplitReport | None = None


def _load(layout: RunLayout) -> list[ModelRow]:
    """One entry per model: θ_start, then θ_{t+1} of each finished iteration t."""
    if not layout.base_eval.exists():
        raise SelfplayError(f"{layout.root} holds no evaluation yet (base/eval.json); is it a "
                            "run directory of `selfplay run`?")
    models = [ModelRow("start", json.loads(layout.base_eval.read_text()))]
    for t in layout.iterations():
        it = layout.iteration(t)
        if not it.eval.exists():
            continue
        log, conv = it.model.log, it.convert_report
        models.append(ModelRow(
            f"iteration {t}", json.loads(it.eval.read_text()),
            [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else [],
            ConvertReport.read(conv).splits.get("train") if conv.exists() else None))
    return models


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def table(models: list[ModelRow]) -> str:
    head = ("| model | accuracy | win rate vs previous | ref. log-lik/token | response tokens "
            "| cut by limit | final loss | reward margin | reward accuracy |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for m in models:
        e, tr = m.eval, (m.train[-1] if m.train else {})
        lines.append(
            f"| {m.name} | {_pct(e['accuracy'])} | {_pct(e.get('win_rate'))} "
            f"| {e['reference_logp_per_token']:.3f} | {e['mean_response_tokens']:.1f} "
            f"| {_pct(e['truncated_share'])} "
            f"| {tr['loss']:.4f} | {tr['rewards/margins']:.3f} | {_pct(tr['rewards/accuracies'])} |"
            if tr else
            f"| {m.name} | {_pct(e['accuracy'])} | {_pct(e.get('win_rate'))} "
            f"| {e['reference_logp_per_token']:.3f} | {e['mean_response_tokens']:.1f} "
            f"| {_pct(e['truncated_share'])} | – | – | – |")
    return "\n".join(lines)


def family_table(models: list[ModelRow]) -> str:
    fams = sorted({f for m in models for f in m.eval["per_family"]})
    if not fams:
        return ""
    lines = ["| family | " + " | ".join(m.name for m in models) + " |",
             "|---|" + "---|" * len(models)]
    for f in fams:
        lines.append(f"| {f} | " + " | ".join(
            _pct(m.eval["per_family"].get(f, {}).get("accuracy")) for m in models) + " |")
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


def plots(models: list[ModelRow], out: Path, method: str = "spin") -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(6, 3.6))
    xs = list(range(len(models)))
    ax.plot(xs, [100 * (m.eval["accuracy"] or 0) for m in models], "o-",
            label="task accuracy (held-out)")
    wr = [(i, 100 * m.eval["win_rate"]) for i, m in enumerate(models)
          if m.eval.get("win_rate") is not None]
    if wr:
        ax.plot([i for i, _ in wr], [w for _, w in wr], "s--", label="win rate vs previous")
    jw = [(i, 100 * m.eval["judge_win_rate"]) for i, m in enumerate(models)
          if m.eval.get("judge_win_rate") is not None]
    if jw:
        ax.plot([i for i, _ in jw], [w for _, w in jw], "^:", label="judge's win rate vs previous")
    ax.set_xticks(xs, [m.name for m in models])
    ax.set_ylabel("%")
    ax.set_title("Accuracy and win rate per iteration")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(out / "iterations.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    trained = [m for m in models if m.train]
    if trained:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
        offset = 0
        for m in trained:
            steps = [offset + r["step"] for r in m.train]
            for ax, key in zip(axes, ("loss", "rewards/margins", "rewards/accuracies")):
                ax.plot(steps, [r[key] for r in m.train], "o-", ms=3, label=m.name)
            offset = steps[-1]
            for ax in axes:
                ax.axvline(offset, color="grey", lw=0.5)
        margin = "chosen − rejected" if method == "sppo" else "real − generated"
        for ax, title in zip(axes, ("loss", f"reward margin ({margin})", "reward accuracy")):
            ax.set_title(title)
            ax.set_xlabel("update")
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.tight_layout()
        paths.append(out / "training.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def write_report(run_dir: str | Path) -> str:
    """Write RUN_DIR/report.md and RUN_DIR/plots/*.png; return the iteration table."""
    layout = RunLayout(Path(run_dir))
    models = _load(layout)
    manifest = json.loads(layout.manifest.read_text()) if layout.manifest.exists() else {}
    recipe = manifest.get("recipe", {})
    pngs = plots(models, layout.plots, recipe.get("method", "spin"))
    t = table(models)
    body = [f"# selfplay run: {layout.root.name}", "",
            f"Method **{recipe.get('method', '?')}**, model `{recipe.get('model_name_or_path')}`, "
            f"dataset `{recipe.get('dataset')}`, {len(models) - 1} iteration(s) finished. "
            "Each row is the model after that iteration, evaluated greedily on the held-out "
            "split; the win rate is against the previous row's model on the same prompts "
            "(right beats wrong, equal counts half); the training columns are the last logged "
            "values of that iteration.", "", t, ""]
    judged = [m for m in models if m.eval.get("judge_win_rate") is not None]
    if judged:
        body += [f"Judge ({judged[0].eval['judge']}) win rate of each iteration's model "
                 "against the previous one on the held-out prompts: "
                 + ", ".join(f"{m.name} {_pct(m.eval['judge_win_rate'])}" for m in judged)
                 + ".", ""]
    pt = pairs_table(models)
    if pt:
        body += ["## Training pairs per iteration", "", pt, ""]
    body += ["## Accuracy per task family", "", family_table(models), ""]
    body += [f"![{p.stem}](plots/{p.name})" for p in pngs]
    stages = manifest.get("stages", {})
    if stages:
        body += ["", "## Stages", "", "| stage | state | seconds |", "|---|---|---|"]
        body += [f"| {k} | {v['state']} | {v.get('seconds', '–')} |" for k, v in stages.items()]
    layout.report.write_text("\n".join(body) + "\n")
    return t
