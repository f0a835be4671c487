"""`selfplay evaluate`: a model on held-out prompts: accuracy, reference likelihood, length,
win rate.

Accuracy needs rows with a checkable answer (`family` and `answer`, as the bundled task suite
writes them); the other measures work on any dataset. The reference likelihood is measured
under the same truncation (max_length, max_prompt_length) as training sees.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from accelerate.utils import gather_object

from selfplay.config import DataSettings, EvaluationSettings, ModelSettings, ScoringSettings
from selfplay.data.evaluations import EvalRow, Evaluation, FamilyScore
from selfplay.data.formats import Example
from selfplay.data.shards import process_slice
from selfplay.data.splits import held_out_split, holds_out, read_for
from selfplay.data.tasks import check
from selfplay.engines import Engine, Generation, SamplingSettings, open_engine, scoring_model
from selfplay.errors import SelfplayError
from selfplay.launch import process_state
from selfplay.logprobs import score_texts
from selfplay.models import load_tokenizer
from selfplay.rendering import response_ids
from selfplay.stages.harness import check_tasks, harness
from selfplay.stats import paired_change, wilson_interval


def is_checkable(ex: Example) -> bool:
    return isinstance(ex.extra.get("family"), str) and isinstance(ex.extra.get("answer"), str)


def correctness(examples: list[Example], gens: list[Generation]) -> list[bool | None]:
    return [check(e.extra["family"], e.extra["answer"], g.text) if is_checkable(e) else None
            for e, g in zip(examples, gens)]


def win_rate(ours: list[bool | None], theirs: list[bool | None]) -> float | None:
    """Head-to-head on the same prompts: right beats wrong, equal counts half."""
    pairs = [(a, b) for a, b in zip(ours, theirs) if a is not None and b is not None]
    if not pairs:
        return None
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)


def answer(engine: Engine, examples: list[Example], max_new_tokens: int, batch_size: int,
           scoring: ScoringSettings, desc: str = "evaluate", reference_likelihood: bool = True,
           loaded: ModelSettings | None = None
           ) -> tuple[list[EvalRow], list[tuple[float, int]] | None]:
    """Greedy answers to the prompts, a row each, and with reference_likelihood each
    reference's summed log-prob and token count. `loaded` names the engine's model, which
    measures reference likelihood."""
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=0.0,
                                batch_size=batch_size)
    gens = engine.generate([e.prompt for e in examples], settings, desc=desc)
    rows = [EvalRow(e.prompt_id, e.extra.get("family"), e.extra.get("answer"), g.text,
                    g.n_tokens, g.finish_reason, r)
            for e, g, r in zip(examples, gens, correctness(examples, gens))]
    if not reference_likelihood:
        return rows, None
    model, tokenizer = scoring_model(engine, loaded)
    scored = score_texts(model, tokenizer, [(e.prompt, [e.reference]) for e in examples],
                         scoring.max_length, scoring.max_prompt_length, batch_size,
                         scoring.logprob_chunk_size, desc="reference likelihood",
                         bf16=bool(loaded and loaded.bf16))
    return rows, [(s[0][0], s[1][0]) for s in scored]


def summarize(rows: list[EvalRow], ref: list[tuple[float, int]] | None,
              settings: dict) -> Evaluation:
    """The measures of answered prompts: accuracy with its interval, overall and per family,
    reference likelihood per token, lengths."""
    fam: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        if r.correct is not None:
            fam[r.family].append(r.correct)
    checked = [r.correct for r in rows if r.correct is not None]
    return Evaluation(
        n=len(rows),
        accuracy=(sum(checked) / len(checked)) if checked else None,
        accuracy_ci95=list(wilson_interval(sum(checked), len(checked))) if checked else None,
        per_family={f: FamilyScore(len(v), sum(v) / len(v), list(wilson_interval(sum(v), len(v))))
                    for f, v in sorted(fam.items())},
        reference_logp_per_token=None if ref is None else
        sum(lp for lp, _ in ref) / max(sum(n for _, n in ref), 1),
        mean_response_tokens=sum(r.n_tokens for r in rows) / len(rows),
        truncated_share=sum(r.finish_reason == "length" for r in rows) / len(rows),
        settings=settings, rows=rows)


def how_evaluated(engine: Engine, max_new_tokens: int, batch_size: int,
                  scoring: ScoringSettings) -> dict:
    return {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "greedy": True,
            "engine": engine.name, "max_length": scoring.max_length,
            "max_prompt_length": scoring.max_prompt_length}


def answer_budget(tokenizer, examples: list[Example], cap: int, explicit: int = 0) -> int:
    """Tokens an evaluated answer may take: `explicit`, else 1.5 times the longest reference
    (rounded up to a multiple of 16, at least 32, at most `cap`). Greedy answers after SFT are
    about as long as the references, so this bounds only the runaways, which cost the most."""
    if explicit:
        return explicit
    longest = max((len(response_ids(tokenizer, e.reference)) for e in examples), default=0)
    return min(cap, max(32, -(-3 * longest // 32) * 16))


def saved_rows(path: Path, prompt_ids: list[str]) -> list[EvalRow]:
    """The rows of a saved eval.json, checked to be the same prompts in the same order."""
    saved = Evaluation.read(path).rows or []
    if [r.prompt_id for r in saved] != prompt_ids:
        # Evaluations of selfplay before 08ba4b1 (2026-11-23) took a dataset's own prompt_id
        # column; since, a prompt's id is the hash of its messages.
        raise SelfplayError(f"--baseline {path} evaluated other prompts than this evaluation "
                            "(another split, size or seed; or it was written by selfplay before "
                            "08ba4b1, 2026-11-23, whose prompt ids were not hashes of the "
                            "prompt: evaluate the baseline again); a paired comparison needs "
                            "the same.")
    return saved


def evaluate_models(model: ModelSettings, data: DataSettings, max_new_tokens: int,
                    scoring: ScoringSettings, evaluation: EvaluationSettings,
                    baseline_rows: list[EvalRow] | None = None) -> Evaluation:
    """Evaluate `model` on the held-out split of `data` (the suite's test split by default).

    With evaluation.baseline (a model, or a saved eval.json of the same prompts) or
    `baseline_rows` (a previous evaluation's rows), adds the head-to-head win rate and the
    paired sign test, and for a baseline model its own measures.
    """
    split = held_out_split(data)
    examples = read_for(data, split, held_out=True).examples
    budget = answer_budget(load_tokenizer(model.model_name_or_path), examples, max_new_tokens,
                           evaluation.eval_max_new_tokens)
    if evaluation.lm_eval_tasks:        # a misspelt task fails now, not after the evaluation
        check_tasks(evaluation)
    baseline = evaluation.baseline
    if baseline.endswith(".json"):      # a saved evaluation: checked now, before any work
        baseline_rows = saved_rows(Path(baseline), [e.prompt_id for e in examples])

    # each process answers its share, and all get the whole; the others wait while the main
    # process runs lm-eval, which can outlast a collective's default timeout
    state = process_state(model, wait_hours=12)
    lo, hi = process_slice(len(examples), state.process_index, state.num_processes)
    device = str(state.device) if model.device == "auto" else model.device

    def run(spec: str, label: str) -> Evaluation:
        this = replace(model, model_name_or_path=spec, device=device)
        engine = open_engine(this, process_index=state.process_index,
                             num_processes=state.num_processes)
        try:
            rows, ref = answer(engine, examples[lo:hi], budget, model.inference_batch_size(),
                               scoring, f"evaluate {label}", evaluation.reference_likelihood,
                               this)
        finally:
            engine.close()
        rows, ref = gather_object(rows), None if ref is None else gather_object(ref)
        r = summarize(rows, ref, how_evaluated(engine, budget, model.inference_batch_size(),
                                               scoring))
        r.model = spec
        return r

    result = run(model.model_name_or_path, "model")
    if evaluation.lm_eval_tasks and state.is_main_process:    # lm-eval runs its own loop
        result.lm_eval = harness(model, evaluation, model.inference_batch_size())
    if baseline and not baseline.endswith(".json"):
        base = run(baseline, "baseline")
        baseline_rows, base.rows = base.rows, None
        result.baseline = base
    if baseline_rows is not None:
        ours, theirs = result.correct(), [r.correct for r in baseline_rows]
        result.win_rate = win_rate(ours, theirs)
        result.paired = paired_change(ours, theirs)
    held = split == data.split and holds_out(data)     # prompts held out of training's split
    result.dataset, result.split = data.dataset, f"{split} (held out)" if held else split
    return result


def format_table(result: Evaluation, baseline: Evaluation | None = None, name: str = "model",
                 baseline_name: str = "baseline") -> str:
    """A plain-text table: per-family accuracy, an overall row, and the other measures."""
    def pct(x):
        return "   -  " if x is None else f"{100 * x:5.1f}%"

    def fam(e: Evaluation, f: str) -> float | None:
        return e.per_family[f].accuracy if f in e.per_family else None

    fams = sorted(set(result.per_family) | set(baseline.per_family if baseline else {}))
    head = f"{'family':<12} {'n':>4}  {name:>10}" + (f"  {baseline_name:>10}" if baseline else "")
    lines = [head, "-" * len(head)]
    for f in fams:
        n = result.per_family[f].n if f in result.per_family else 0
        line = f"{f:<12} {n:>4}  {pct(fam(result, f)):>10}"
        if baseline:
            line += f"  {pct(fam(baseline, f)):>10}"
        lines.append(line)
    line = f"{'overall':<12} {result.n:>4}  {pct(result.accuracy):>10}"
    if baseline:
        line += f"  {pct(baseline.accuracy):>10}"
    lines += ["-" * len(head), line]
    if result.accuracy_ci95:
        lo, hi = result.accuracy_ci95
        lines.append(f"{'  95% interval':<17}  {100 * lo:.1f}-{100 * hi:.1f}%")
    lines.append("")
    rows = [("reference log-lik/token", "reference_logp_per_token", "{:.3f}"),
            ("mean response tokens", "mean_response_tokens", "{:.1f}"),
            ("cut by token limit", "truncated_share", "{:.1%}")]

    def cell(e: Evaluation, key: str, fmt: str) -> str:
        v = getattr(e, key)
        return "-" if v is None else fmt.format(v)    # not measured

    for label, key, fmt in rows:
        line = f"{label:<24} {cell(result, key, fmt):>10}"
        if baseline:
            line += f"  {cell(baseline, key, fmt):>10}"
        lines.append(line)
    if baseline and result.win_rate is not None:
        lines.append(f"{'win rate vs baseline':<24} {result.win_rate:>10.1%}")
    if result.paired:        # against a baseline model or a saved evaluation
        p = result.paired
        lines.append(f"{'paired change':<24} {100 * p.delta:+9.1f} pts ({p.gained} gained, "
                     f"{p.lost} lost of {p.n}; sign test p = {p.p_value:.3g})")
    return "\n".join(lines)
