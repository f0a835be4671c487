"""Preference oracles for SPPO: a judge turns K responses to one prompt into a K×K matrix.

P[i][j] = P(y_i ≻ y_j), with P[j][i] = 1 − P[i][j] and ½ on the diagonal. From it,
win_rates() estimates each response's win rate against the current policy, P̂(y_i ≻ π_t),
as the mean over the K samples including the self term ½ (as the paper's code does), and
sppo_pair() picks chosen (highest) and rejected (lowest) with the columns of the official
SPPO data: chosen_probs = P[w][l], chosen_probs_win = P̂(y_w ≻ π_t),
chosen_probs_lose = P̂(y_l ≻ π_t).

Judges:
  rule          responses with a checkable answer (the task suite): right beats wrong, ties ½
  reward-model  any Hugging Face sequence-classification reward model: σ(r_i − r_j)
  pairrm        PairRM through llm-blender (optional extra), with either estimator below
  a callable    `module:function`, for users' own judges

PairRM estimators, over a comparison function C(x, a, b) (a logit, > 0 when a is better):
  paper     s_i = mean_j (C[i,j] − C[j,i]) over all K columns (the zero diagonal included),
            then P[i][j] = σ(s_i − s_j) (uclaml/SPPO; s_i − s_j depends on the other
            candidates, uclaml/SPPO#15)
  pairwise  one comparison per ordered pair, symmetrised: P[i][j] = ½ (σ(C[i,j]) + σ(−C[j,i]))
"""

from __future__ import annotations

import importlib
import math
from typing import Callable, Sequence

from selfplay.errors import SelfplayError

Matrix = list[list[float]]
Compare = Callable[[list[dict], str, str], float]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def from_scores(scores: Sequence[float]) -> Matrix:
    """Bradley–Terry: P[i][j] = σ(s_i − s_j)."""
    return [[_sigmoid(a - b) for b in scores] for a in scores]


def from_outcomes(correct: Sequence[bool]) -> Matrix:
    """Right beats wrong; equal outcomes count half."""
    return [[0.5 if a == b else (1.0 if a else 0.0) for b in correct] for a in correct]


def paper_estimator(compare: Compare, prompt: list[dict], responses: Sequence[str]) -> Matrix:
    k = len(responses)
    c = [[0.0 if i == j else compare(prompt, responses[i], responses[j]) for j in range(k)]
         for i in range(k)]
    s = [sum(c[i][j] - c[j][i] for j in range(k)) / k for i in range(k)]
    return from_scores(s)


def pairwise_estimator(compare: Compare, prompt: list[dict], responses: Sequence[str]) -> Matrix:
    k = len(responses)
    c = [[0.0 if i == j else compare(prompt, responses[i], responses[j]) for j in range(k)]
         for i in range(k)]
    return [[0.5 if i == j else 0.5 * (_sigmoid(c[i][j]) + _sigmoid(-c[j][i]))
             for j in range(k)] for i in range(k)]


def win_rates(p: Matrix) -> list[float]:
    """P̂(y_i ≻ π_t): the mean of row i over all K samples, the self term ½ included."""
    return [sum(row) / len(row) for row in p]


def sppo_pair(p: Matrix) -> dict | None:
    """Chosen = highest win rate, rejected = lowest; None when all K responses tie."""
    w = win_rates(p)
    hi, lo = max(range(len(w)), key=w.__getitem__), min(range(len(w)), key=w.__getitem__)
    if math.isclose(w[hi], w[lo], abs_tol=1e-12):
        return None
    return {"chosen_index": hi, "rejected_index": lo, "chosen_probs": p[hi][lo],
            "chosen_probs_win": w[hi], "chosen_probs_lose": w[lo]}


# ---------------------------------------------------------------------------------------
# Judges
# ---------------------------------------------------------------------------------------

class RuleJudge:
    """For rows with a checker (the bundled task suite's `family` and `answer`)."""
    name = "rule"

    def matrix(self, prompt: list[dict], responses: Sequence[str], extra: dict) -> Matrix:
        from selfplay.data.tasks import check
        if not isinstance(extra.get("family"), str) or not isinstance(extra.get("answer"), str):
            raise SelfplayError("the rule judge needs rows with `family` and `answer` (the "
                                "bundled task suite); use --judge reward-model or pairrm.")
        return from_outcomes([check(extra["family"], extra["answer"], r) for r in responses])


class RewardModelJudge:
    """A sequence-classification reward model: P(i beats j) = σ(r_i − r_j)."""
    name = "reward-model"

    def __init__(self, model: str, device: str = "cpu", batch_size: int = 16):
        import torch
        from transformers import AutoModelForSequenceClassification

        from selfplay.models import _from_pretrained, load_tokenizer, resolve
        src = resolve(model)
        self.tok = load_tokenizer(src)
        self.model = _from_pretrained(AutoModelForSequenceClassification, src,
                                      dtype=torch.float32).to(device).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tok.pad_token_id
        self.device, self.batch_size = device, batch_size

    def rewards(self, prompt: list[dict], responses: Sequence[str]) -> list[float]:
        import torch
        texts = [self.tok.apply_chat_template(prompt + [{"role": "assistant", "content": r}],
                                              tokenize=False) for r in responses]
        out = []
        with torch.no_grad():
            for s in range(0, len(texts), self.batch_size):
                enc = self.tok(texts[s:s + self.batch_size], return_tensors="pt", padding=True,
                               add_special_tokens=False, truncation=True).to(self.device)
                out += self.model(**enc).logits[:, 0].float().tolist()
        return out

    def matrix(self, prompt: list[dict], responses: Sequence[str], extra: dict) -> Matrix:
        return from_scores(self.rewards(prompt, responses))


class PairRMJudge:
    """PairRM (llm-blender), an optional extra: `pip install llm-blender` and its weights."""
    name = "pairrm"

    def __init__(self, estimator: str = "paper", model: str = "llm-blender/PairRM"):
        try:
            blender_mod = importlib.import_module("llm_blender")
        except ImportError:
            raise SelfplayError("--judge pairrm needs the optional package llm-blender "
                                "(pip install llm-blender) and the PairRM weights.") from None
        self.blender = blender_mod.Blender()
        self.blender.loadranker(model)
        self.estimate = paper_estimator if estimator == "paper" else pairwise_estimator

    def _compare(self, prompt: list[dict], a: str, b: str) -> float:
        text = prompt[-1]["content"]
        return float(self.blender.compare([text], [a], [b], return_logits=True)[0])

    def matrix(self, prompt: list[dict], responses: Sequence[str], extra: dict) -> Matrix:
        return self.estimate(self._compare, prompt, responses)


class CallableJudge:
    """`module:function`, called as function(prompt_messages, responses, extra) -> K×K matrix."""
    name = "callable"

    def __init__(self, spec: str):
        mod, _, fn = spec.partition(":")
        try:
            self.fn = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError, ValueError):
            raise SelfplayError(f"--judge {spec!r}: no function {fn!r} in module {mod!r}; "
                                "write it as module:function.") from None
        self.name = spec

    def matrix(self, prompt: list[dict], responses: Sequence[str], extra: dict) -> Matrix:
        return check_matrix(self.fn(prompt, list(responses), extra), len(responses), self.name)


def check_matrix(p, k: int, who: str) -> Matrix:
    """A judge's matrix must be K×K probabilities with P[i][j] + P[j][i] = 1."""
    rows = [list(map(float, r)) for r in p]
    if len(rows) != k or any(len(r) != k for r in rows):
        raise SelfplayError(f"judge {who} returned a matrix that is not {k}x{k}.")
    for i in range(k):
        for j in range(k):
            if not 0.0 <= rows[i][j] <= 1.0 or abs(rows[i][j] + rows[j][i] - 1.0) > 1e-6:
                raise SelfplayError(f"judge {who}: P[{i}][{j}] = {rows[i][j]} and P[{j}][{i}] = "
                                    f"{rows[j][i]} are not probabilities that sum to 1.")
    return rows


def make_judge(name: str, reward_model: str = "", estimator: str = "paper",
               device: str = "cpu"):
    if name == "rule":
        return RuleJudge()
    if name == "reward-model":
        if not reward_model:
            raise SelfplayError("--judge reward-model needs --reward_model (a hub id or path).")
        return RewardModelJudge(reward_model, device)
    if name == "pairrm":
        return PairRMJudge(estimator)
    if ":" in name:
        return CallableJudge(name)
    raise SelfplayError(f"--judge {name!r} is not one of: rule, reward-model, pairrm, or "
                        "module:function.")


# ---------------------------------------------------------------------------------------
# The rank stage: generation shards in, the same rows with their K×K matrix out
# ---------------------------------------------------------------------------------------

def rank_shards(shards_dir, output_dir, judge, overwrite: bool = False) -> list:
    """Judge every shard of `shards_dir` into `output_dir` (same names); finished ones skip."""
    import sys
    from pathlib import Path

    from tqdm.auto import tqdm

    from selfplay.data.pairs import SHARD_RE
    from selfplay.generation import read_jsonl, write_jsonl_atomic

    shards_dir, output_dir = Path(shards_dir), Path(output_dir)
    shards = sorted(p for p in shards_dir.glob("*.jsonl") if SHARD_RE.match(p.name))
    if not shards:
        raise SelfplayError(f"{shards_dir} holds no generation shards to rank.")
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for p in shards:
        dest = output_dir / p.name
        written.append(dest)
        if dest.exists() and not overwrite:
            print(f"{dest} is ranked already; skipping it.", file=sys.stderr)
            continue
        rows = read_jsonl(p)
        if rows and len(rows[0]["responses"]) < 2:
            raise SelfplayError(f"{p}: ranking needs K >= 2 responses per prompt; generate "
                                "with --num_samples 5 --temperature 0.7 --top_p 0.9.")
        for r in tqdm(rows, desc=f"rank {p.name}", unit="prompt", mininterval=1.0):
            r["matrix"] = judge.matrix(r["prompt"], r["responses"], r.get("extra", {}))
            r["win_rates"] = win_rates(r["matrix"])
            r["judge"] = judge.name
        write_jsonl_atomic(dest, rows)
    return written
