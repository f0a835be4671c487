"""lm-evaluation-harness on a model: `selfplay evaluate --lm_eval_tasks` and every model of
`selfplay run`.

The SPIN paper's headline numbers are lm-eval numbers (the Open LLM Leaderboard tasks). The
harness runs on the model as our loader loads it (the same weights, dtype and device as our
own evaluation), with its own task names, few-shot settings and `--lm_eval_limit`. Hub tasks
need the network or their cached datasets; `--lm_eval_include DIR` adds the task YAMLs of a
directory (lm-eval's include_path), such as a task over a local file. Results go into the
evaluation JSON under `lm_eval`: each task's metrics with their standard errors, the samples
and shots used, and per sample its filtered responses and metric values (lm-eval's
log_samples, without the prompts).
"""

from __future__ import annotations

import difflib
import functools
import importlib.metadata as md
import math
from typing import Any

from selfplay.config import EvaluationSettings, ModelSettings
from selfplay.errors import SelfplayError
from selfplay.models import load_model


def task_names(spec: str) -> list[str]:
    return [t.strip() for t in spec.split(",") if t.strip()]


def _number(x: Any) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):            # lm-eval writes "N/A" for a missing stderr
        return None
    return x if math.isfinite(x) else None


def _metrics(result: dict[str, Any]) -> dict[str, float | None]:
    """lm-eval's `metric,filter` keys as `metric` (filter `none`) or `metric,filter`."""
    out = {}
    for key, value in result.items():
        if "," not in key:
            continue
        metric, filt = key.split(",", 1)
        out[metric if filt == "none" else key] = _number(value)
    return out


def _sample(s: dict[str, Any], metric_names: list[str]) -> dict[str, Any]:
    resps = s.get("filtered_resps")
    return {"doc_id": s.get("doc_id"), "target": str(s.get("target")),
            "filtered_resps": [[_number(x) if isinstance(x, float) else x for x in r]
                               if isinstance(r, (list, tuple)) else r for r in resps or []],
            **{m: _number(s[m]) for m in metric_names if m in s}}


@functools.lru_cache(maxsize=4)
def _manager(include: str, defaults: bool):
    """lm-eval's task index: its own thousands of tasks take seconds to index, so once per
    process, and not at all when every task asked for is in --lm_eval_include."""
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=include or None, include_defaults=defaults)


def check_tasks(evaluation: EvaluationSettings):
    """(task names, lm-eval's task manager), every name checked before any work is done."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise SelfplayError("--lm_eval_tasks needs lm-evaluation-harness: pip install "
                            "'selfplay[lm-eval]' (or pip install lm-eval).") from None
    tasks = task_names(evaluation.lm_eval_tasks)
    manager = _manager(evaluation.lm_eval_include, False) if evaluation.lm_eval_include else None
    if manager is None or not set(tasks) <= set(manager.all_tasks):
        manager = _manager(evaluation.lm_eval_include, True)
    known = set(manager.all_tasks)
    for t in tasks:
        if t not in known:
            near = difflib.get_close_matches(t, known, n=1)
            raise SelfplayError(
                f"--lm_eval_tasks: lm-eval has no task {t!r}"
                + (f" (did you mean {near[0]!r}?)" if near else "")
                + (f" in its registry or {evaluation.lm_eval_include}"
                   if evaluation.lm_eval_include else
                   "; a task of your own needs --lm_eval_include DIR (its YAML's directory)")
                + ".")
    return tasks, manager


def harness(model: ModelSettings, evaluation: EvaluationSettings, batch_size: int
            ) -> dict[str, Any]:
    """Run evaluation.lm_eval_tasks on model; the scores as the evaluation JSON keeps them."""
    tasks, manager = check_tasks(evaluation)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm, tok = load_model(model.model_name_or_path, model.device, model.dtype)
    wrapped = HFLM(pretrained=lm, tokenizer=tok, batch_size=batch_size, device=str(lm.device))
    limit = evaluation.lm_eval_limit or None
    out = lm_eval.simple_evaluate(
        model=wrapped, tasks=tasks, task_manager=manager, limit=limit, log_samples=True,
        num_fewshot=None if evaluation.lm_eval_num_fewshot < 0
        else evaluation.lm_eval_num_fewshot)
    if out is None:                            # lm-eval returns None off its rank 0
        return {}
    scores = {t: _metrics(r) for t, r in out["results"].items()}
    return {
        "tasks": scores,
        "n_samples": {t: (n or {}).get("effective") for t, n in out.get("n-samples", {}).items()},
        "num_fewshot": out.get("n-shot", {}),
        "limit": limit,
        "lm_eval_version": md.version("lm_eval"),
        "samples": {t: [_sample(s, [m for m in scores.get(t, {}) if "_stderr" not in m])
                        for s in ss] for t, ss in out.get("samples", {}).items()},
    }
