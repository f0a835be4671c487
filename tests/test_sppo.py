"""SPPO's pure parts: win matrices, estimators, pair selection, losses (one checked with TRL)."""

import math
import sys
import types

import pytest
import torch

from helpers import make_tiny_model
from selfplay import judges
from selfplay.config import RankSettings
from selfplay.judges import preferences as prefs
from selfplay.errors import SelfplayError



def test_win_rates_include_the_self_term():
    """Outcomes right, wrong, right: rows [½, 1, ½], [0, ½, 0], [½, 1, ½].
    Win rates (K = 3, self term ½ included): 2/3, 1/6, 2/3."""
    p = prefs.from_outcomes([True, False, True])
    assert p == [[0.5, 1.0, 0.5], [0.0, 0.5, 0.0], [0.5, 1.0, 0.5]]
    assert prefs.win_rates(p) == pytest.approx([2 / 3, 1 / 6, 2 / 3])
    pair = prefs.sppo_pair(p)
    assert (pair.chosen_index, pair.rejected_index) == (0, 1)     # first of the tied best
    assert pair.chosen_probs == 1.0
    assert pair.chosen_probs_win == pytest.approx(2 / 3)
    assert pair.chosen_probs_lose == pytest.approx(1 / 6)


def test_all_ties_give_no_pair():
    assert prefs.sppo_pair(prefs.from_outcomes([False] * 5)) is None
    assert prefs.sppo_pair(prefs.from_scores([1.3] * 4)) is None


def test_bradley_terry_matrix_by_hand():
    """scores 0 and ln 3: P[0][1] = σ(−ln 3) = 1/4, P[1][0] = 3/4."""
    p = prefs.from_scores([0.0, math.log(3)])
    assert p[0][1] == pytest.approx(0.25) and p[1][0] == pytest.approx(0.75)
    assert prefs.win_rates(p) == pytest.approx([0.375, 0.625])


def _compare_by_length(prompt, a, b):
    """A stand-in for PairRM: logit = (len(a) − len(b)) / 10, plus a bias toward the first slot."""
    return (len(a) - len(b)) / 10 + 0.2


def test_paper_estimator_by_hand():
    """responses of length 10, 20, 30: C[i][j] = (L_i − L_j)/10 + 0.2 off the diagonal.
    s_i = mean over K = 3 columns of C[i][j] − C[j][i] = (2/3)·Σ_j (L_i − L_j)/10 (bias cancels):
    s = (−2, 0, 2); P[i][j] = σ(s_i − s_j)."""
    rs = ["a" * 10, "b" * 20, "c" * 30]
    p = prefs.paper_estimator(_compare_by_length, [], rs)
    s = [-2.0, 0.0, 2.0]
    for i in range(3):
        for j in range(3):
            assert p[i][j] == pytest.approx(1 / (1 + math.exp(-(s[i] - s[j]))))


def test_pairwise_estimator_by_hand():
    """P[i][j] = ½(σ(C[i][j]) + σ(−C[j][i])); for lengths 10, 20: C[0][1] = −0.8, C[1][0] = 1.2,
    P[0][1] = ½(σ(−0.8) + σ(−1.2)), and P[1][0] = 1 − P[0][1]."""
    p = prefs.pairwise_estimator(_compare_by_length, [], ["a" * 10, "b" * 20])
    sig = lambda x: 1 / (1 + math.exp(-x))
    assert p[0][1] == pytest.approx(0.5 * (sig(-0.8) + sig(-1.2)))
    assert p[0][1] + p[1][0] == pytest.approx(1.0) and p[0][0] == 0.5


def test_rule_judge_on_task_rows():
    j = judges.make_judge(RankSettings("rule"))
    p = j.matrix([], ["Answer: 4", "Answer: 5", "It is 4"], {"family": "arithmetic",
                                                              "answer": "4"})
    assert p == prefs.from_outcomes([True, False, True])
    with pytest.raises(SelfplayError, match="rule judge needs rows with `family`"):
        j.matrix([], ["x", "y"], {})


def test_callable_judge_and_matrix_checks(monkeypatch):
    mod = types.ModuleType("my_judges")
    mod.longer = lambda prompt, rs, extra: prefs.from_scores([len(r) for r in rs])
    mod.broken = lambda prompt, rs, extra: [[0.5, 0.9], [0.9, 0.5]]
    monkeypatch.setitem(sys.modules, "my_judges", mod)
    p = judges.make_judge(RankSettings("my_judges:longer")).matrix([], ["a", "bbb"], {})
    assert p[1][0] > 0.5
    with pytest.raises(SelfplayError, match="not probabilities that sum to 1"):
        judges.make_judge(RankSettings("my_judges:broken")).matrix([], ["a", "b"], {})
    with pytest.raises(SelfplayError, match="no function 'nope'"):
        judges.make_judge(RankSettings("my_judges:nope"))


def test_reward_model_judge(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer, LlamaForSequenceClassification
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = make_tiny_model(tok).config
    cfg.num_labels = 1
    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    j = judges.make_judge(RankSettings("reward-model", reward_model=str(tmp_path / "rm")))
    prompt = [{"role": "user", "content": "Hi?"}]
    rs = ["Hello!", "Go away.", "Hello there, how can I help?"]
    r = j.rewards(prompt, rs)
    p = j.matrix(prompt, rs, {})
    assert p[0][1] == pytest.approx(1 / (1 + math.exp(-(r[0] - r[1]))))
    prefs.check_matrix(p, 3, "rm")                       # a valid preference matrix


# ---------------------------------------------------------------------------------------
# SPPO end to end on the tiny model
# ---------------------------------------------------------------------------------------

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

from safetensors.torch import load_file  # noqa: E402

from helpers import write_parquet  # noqa: E402
from selfplay.cli import main  # noqa: E402

TESTS = str(Path(__file__).parent)


def sppo_args(model_dir, out, *extra):
    return ["run", "--method", "sppo", "--model", str(model_dir), "--output_dir", str(out),
            "--judge", "stand_in_judges:by_length", "--num_samples", "3", "--max_prompts", "6",
            "--tasks_test_size", "4", "--max_new_tokens", "6", "--per_device_train_batch_size",
            "3", "--learning_rate", "1e-3", "--beta", "0.1", "--logging_steps", "1", *extra]


@pytest.fixture(scope="module")
def sppo_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sppo") / "full"
    assert main(sppo_args(tiny_model_dir, out)) == 0
    return out


def test_sppo_run_two_iterations(sppo_run):
    m = json.loads((sppo_run / "manifest.json").read_text())
    assert list(m["stages"])[1:6] == [f"iter0/{s}" for s in ("generate", "rank", "convert",
                                                              "train", "evaluate")]
    rows = [json.loads(x) for x in next((sppo_run / "iter0" / "ranked").glob("*.jsonl"))
            .read_text().splitlines()]
    assert len(rows) == 6 and len(rows[0]["responses"]) == 3
    assert rows[0]["settings"]["temperature"] == 0.7 and rows[0]["settings"]["top_p"] == 0.9
    assert len(rows[0]["matrix"]) == 3 and rows[0]["judge"] == "stand_in_judges:by_length"
    # Not every sample is scored at generation: the trainer scores the chosen and rejected.
    assert "ref_logp_responses" not in rows[0]
    ref = json.loads((sppo_run / "iter0" / "model" / "reference_logps.json").read_text())
    import pyarrow.parquet as pq
    pairs = pq.read_table(sppo_run / "iter0" / "pairs" /
                          "train_prefs-00000-of-00001.parquet").to_pylist()
    assert {"chosen", "rejected", "chosen_probs", "chosen_probs_win",
            "chosen_probs_lose"} <= set(pairs[0])
    for p in pairs:   # chosen is the longest sample, as the stand-in judge prefers
        assert len(p["chosen"][-1]["content"]) >= len(p["rejected"][-1]["content"])
        assert p["chosen_probs_win"] > p["chosen_probs_lose"]
    log = [json.loads(x) for x in (sppo_run / "iter0" / "model" / "train_log.jsonl")
           .read_text().splitlines()]
    assert "rewards/chosen" in log[0] and log[0]["loss"] > 0
    assert len(ref["chosen"]) == len(pairs)
    ev = json.loads((sppo_run / "iter1" / "eval.json").read_text())
    assert 0.0 <= ev["judge_win_rate"] <= 1.0
    report = (sppo_run / "report.md").read_text()
    assert "Judge (stand_in_judges:by_length) win rate" in report
    conv = json.loads((sppo_run / "iter0" / "pairs" / "convert_report.json").read_text())
    n = conv["splits"]["train"]
    assert n["pairs"] + n["all_tie_prompts_left_out"] == 6 and n["scored"] is False
    assert f"| iteration 0 | 6 | {n['pairs']} |" in report and "mean P̂(chosen ≻ π_t)" in report


def test_sppo_resume_after_rank(tiny_model_dir, sppo_run, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "selfplay", *sppo_args(tiny_model_dir, out)]
    env = {**os.environ, "PYTHONPATH": TESTS}
    killed = subprocess.run(cmd, env={**env, "SELFPLAY_KILL_AFTER": "iter0/rank"},
                            capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[iter0/rank] redo" in done.stderr and "[iter0/generate] done; skipped" in done.stderr
    a = load_file(sppo_run / "iter1" / "model" / "model.safetensors")
    b = load_file(out / "iter1" / "model" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)


def test_rank_command_and_ties(tiny_model_dir, tmp_path):
    from selfplay.config import ConvertSettings
    from selfplay.data.shards import shard_name
    from selfplay.io import write_jsonl_atomic
    from selfplay.stages.convert import convert
    gen = tmp_path / "gen"
    gen.mkdir()
    rows = [{"prompt_id": f"p{i}", "prompt": [{"role": "user", "content": f"{i} + 1?"}],
             "reference": f"Answer: {i + 1}", "responses": [f"Answer: {i + 1}", "Answer: 0",
                                                            f"Answer: {i + 1}"],
             "response_tokens": [3, 3, 3], "finish_reasons": ["eos"] * 3,
             "extra": {"family": "arithmetic", "answer": str(i + 1)}} for i in range(1, 4)]
    rows.append({**rows[0], "prompt_id": "tie", "responses": ["Answer: 0"] * 3})
    write_jsonl_atomic(gen / shard_name("train", 0, 0, 1), rows)
    assert main(["rank", "--input_dir", str(gen), "--output_dir", str(tmp_path / "ranked")]) == 0
    rep = convert(ConvertSettings(str(tmp_path / "ranked")), tmp_path / "pairs").splits["train"]
    assert rep.pairs == 3 and rep.all_tie_prompts_left_out == 1
    import pyarrow.parquet as pq
    p = pq.read_table(tmp_path / "pairs" / "train_prefs-00000-of-00001.parquet").to_pylist()[0]
    assert p["chosen"][-1]["content"] == "Answer: 2" and p["rejected"][-1]["content"] == \
        "Answer: 0"
    assert (p["chosen_probs"], p["chosen_probs_win"], p["chosen_probs_lose"]) == \
        pytest.approx((1.0, 2 / 3, 1 / 6))


def _published_sppo(n=8):
    rows = []
    for i in range(n):
        u = {"role": "user", "content": f"Say a word with {i + 3} letters."}
        rows.append({"chosen": [u, {"role": "assistant", "content": "x" * (i + 3)}],
                     "rejected": [u, {"role": "assistant", "content": "no"}],
                     "chosen_probs": 0.8, "chosen_probs_win": 0.7, "chosen_probs_lose": 0.3})
    return rows


@pytest.mark.parametrize("loss,first", [("sppo", 4.0), ("sppo_single", 9.0), ("sppo_hard", 50.0)])
def test_train_on_published_sppo_layout(tiny_model_dir, tmp_path, loss, first):
    """At step 1 the policy is the reference (ℓ = 0), so the loss is fixed by the columns:
    η = 1/β = 10; sppo: ½[(10·0.2)² + (10·(−0.2))²] = 4; sppo_single (P = 0.8):
    ½[(10·0.3)² + (10·0.3)²] = 9; sppo_hard: (−5)² + 5² = 50."""
    data = tmp_path / "synthetic_data_score"
    write_parquet(data / "train.parquet", _published_sppo())
    out = tmp_path / loss
    assert main(["train", "--model", str(tiny_model_dir), "--dataset", str(data),
                 "--output_dir", str(out), "--loss_type", loss, "--beta", "0.1",
                 "--per_device_train_batch_size", "4", "--max_steps", "4", "--logging_steps",
                 "1", "--learning_rate", "1e-5"]) == 0
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["loss"] == pytest.approx(first, rel=1e-5)
    assert len(log) == 4 and all(math.isfinite(r["loss"]) for r in log)


def test_sppo_loss_needs_probability_columns(tiny_model_dir, tmp_path, capsys):
    rows = [{k: v for k, v in r.items() if k != "chosen_probs_win"} for r in _published_sppo()]
    write_parquet(tmp_path / "d" / "train.parquet", rows)
    assert main(["train", "--model", str(tiny_model_dir), "--dataset", str(tmp_path / "d"),
                 "--output_dir", str(tmp_path / "o"), "--loss_type", "sppo"]) == 2
    assert "needs the columns chosen_probs_win, chosen_probs_lose" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [["--use_peft"], ["--use_peft", "--load_in_4bit"]],
                         ids=["lora", "qlora"])
def test_sppo_loss_with_lora_and_qlora(tiny_model_dir, tmp_path, extra):
    """The reference is the same model with the adapter off (QLoRA: the 4-bit base), so at
    step 1 ℓ = 0 and the loss is the columns' 4.0, as with full fine-tuning."""
    if "--load_in_4bit" in extra:
        pytest.importorskip("bitsandbytes")
    data = tmp_path / "synthetic_data_score"
    write_parquet(data / "train.parquet", _published_sppo())
    out = tmp_path / "out"
    assert main(["train", "--model", str(tiny_model_dir), "--dataset", str(data),
                 "--output_dir", str(out), "--loss_type", "sppo", "--beta", "0.1",
                 "--per_device_train_batch_size", "4", "--max_steps", "4", "--logging_steps",
                 "1", "--learning_rate", "1e-3", "--lora_r", "4", *extra]) == 0
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["loss"] == pytest.approx(4.0, rel=1e-5)
    assert log[-1]["loss"] < log[0]["loss"]
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(out)                 # merged, in full precision
    assert m.dtype == torch.float32 and not any("lora" in n for n, _ in m.named_parameters())


def test_sppo_run_with_qlora(tiny_model_dir, tmp_path):
    """Two iterations of the loop on a 4-bit base: iteration 1 quantizes θ_1, merged."""
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "qlora"
    assert main(sppo_args(tiny_model_dir, out, "--use_peft", "--load_in_4bit", "--lora_r",
                          "4")) == 0
    for t in (0, 1):
        assert (out / f"iter{t}" / "model" / "model.safetensors").exists()
        assert (out / f"iter{t}" / "model" / "reference_logps.json").exists()
    assert json.loads((out / "iter1" / "eval.json").read_text())["judge"] == \
        "stand_in_judges:by_length"


def test_sppo_run_with_only_ties_says_so(tiny_model_dir, tmp_path, capsys):
    args = sppo_args(tiny_model_dir, tmp_path / "ties", "--num_iterations", "1")
    args[args.index("stand_in_judges:by_length")] = "stand_in_judges:always_tie"
    assert main(args) == 2
    assert "iteration 0 has no training pairs: the judge tied all K samples of all 6 " \
        "prompts" in capsys.readouterr().err
