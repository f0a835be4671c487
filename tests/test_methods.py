"""The self-play family: iterative DPO, regularized SPIN and SPPO, and the best iteration chosen
on validation: the selection rule, contradictions refused, and tiny runs of each method end to
end (their losses by hand: tests/test_losses.py)."""

import json
import os

import pyarrow.parquet as pq
import pytest

from helpers import write_parquet
from selfplay.cli import main
from selfplay.data.evaluations import EvalRow, Evaluation
from selfplay.errors import SelfplayError
from selfplay.selection import Candidate, select


# ---------------------------------------------------------------------------------------
# The best iteration, chosen on validation
# ---------------------------------------------------------------------------------------

def _eval(correct: list[bool]) -> Evaluation:
    rows = [EvalRow(f"p{i}", "f", "1", "", 1, "stop", c) for i, c in enumerate(correct)]
    return Evaluation(n=len(rows), accuracy=sum(correct) / len(correct), accuracy_ci95=None,
                      per_family={}, reference_logp_per_token=None, mean_response_tokens=1.0,
                      truncated_share=0.0, settings={}, rows=rows, split="validation")


def _cands(*outcomes: str) -> list[Candidate]:
    return [Candidate("start" if i == 0 else f"iteration {i - 1}", f"m{i}",
                      _eval([c == "1" for c in o])) for i, o in enumerate(outcomes)]


def test_selection_keeps_the_last_model_that_gained():
    """θ_0 right on 2 of 6; iteration 0 on 4 (gains); iteration 1 loses one of those 4 and
    gains another (3↑... no: 1↑ 1↓ against iteration 0, no gain); iteration 2 on 3 (no gain):
    the best is iteration 0, and patience 2 stops after iteration 2."""
    c = _cands("110000", "111100", "111010", "111000")
    sel = select(c, patience=2)
    assert sel.chosen.name == "iteration 0" and sel.stop
    assert [v.gain for v in sel.verdicts] == [True, True, False, False]
    assert sel.verdicts[2].against == "iteration 0"
    assert sel.verdicts[1].change.gained == 2 and sel.verdicts[1].change.lost == 0
    assert "iteration 0 is the last model to gain on validation: +33.3 pts against start" \
        in sel.reason()
    assert not select(c, patience=3).stop and not select(c, patience=0).stop


def test_selection_never_returns_a_model_below_theta0():
    sel = select(_cands("111000", "110000", "100000", "111000"), patience=0)
    assert sel.best == 0 and sel.chosen.name == "start"
    assert all(v.accuracy <= sel.chosen.accuracy for v in sel.verdicts)
    assert sel.reason().startswith("No iteration answered more validation prompts right")


def test_selection_needs_checkable_answers_on_the_same_prompts():
    c = _cands("10", "11")
    c[1].eval.rows[0].prompt_id = "other"
    with pytest.raises(SelfplayError, match="other prompts"):
        select(c, 0)
    c = _cands("10", "11")
    c[1].eval.accuracy = None
    with pytest.raises(SelfplayError, match="no checkable answer"):
        select(c, 0)


# ---------------------------------------------------------------------------------------
# Options that contradict each other, refused before any work
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra,words", [
    (["--method", "dpo", "--loss_type", "sppo"], "--method dpo (iterative DPO) needs"),
    (["--method", "dpo", "--num_samples", "1", "--temperature", "0"], "best against worst"),
    (["--method", "sppo", "--ref_mixture", "0.5"], "--ref_mixture needs a loss of answer"),
    (["--method", "sppo", "--opponent_history", "2"], "it needs --method spin"),
    (["--patience", "2"], "it needs --select_on validation"),
    (["--opponent_history", "2", "--fresh_prompts", "true"], "choose one of the two"),
    (["--select_on", "validation", "--eval_split", "validation"], "would make them one split"),
    (["--ref_mixture", "1.5"], "--ref_mixture must lie in [0, 1]"),
    (["--kl_type", "sideways"], "--kl_type"),
])
def test_contradictions_are_one_sentence(tiny_model_dir, tmp_path, capsys, extra, words):
    out = tmp_path / "run"
    assert main(["run", "--model", str(tiny_model_dir), "--output_dir", str(out),
                 *extra]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1, err
    assert not out.exists()


def test_select_on_a_dataset_without_that_split(tiny_model_dir, tmp_path, capsys):
    u = {"role": "user", "content": "What is 1 plus 1?"}
    data = write_parquet(tmp_path / "d" / "train.parquet",
                         [{"messages": [u, {"role": "assistant", "content": "2"}]}] * 4)
    assert main(["run", "--model", str(tiny_model_dir), "--dataset", str(data.parent),
                 "--output_dir", str(tmp_path / "run"), "--select_on", "validation"]) == 2
    assert f"{data.parent} has none" in capsys.readouterr().err


def test_regularizing_train_needs_theta0(tiny_model_dir, tmp_path, capsys):
    data = write_parquet(tmp_path / "p" / "train_prefs.parquet", _sppo_rows())
    assert main(["train", "--model", str(tiny_model_dir), "--dataset", str(data.parent),
                 "--output_dir", str(tmp_path / "o"), "--kl_coef", "0.1",
                 "--report_to", "none"]) == 2
    assert "name it with --base_model" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# End to end on the tiny model
# ---------------------------------------------------------------------------------------

def _sppo_rows(n=6):
    u = [{"role": "user", "content": f"Say a word with {i + 3} letters."} for i in range(n)]
    return [{"chosen": [m, {"role": "assistant", "content": "x" * (i + 3)}],
             "rejected": [m, {"role": "assistant", "content": "no"}], "chosen_probs": 0.8,
             "chosen_probs_win": 0.7, "chosen_probs_lose": 0.3} for i, m in enumerate(u)]


def test_rspo_term_at_theta0_adds_its_value(tiny_model_dir, tmp_path):
    """θ = θ_t = θ_0 at the first step: d = 0 on both answers, so forward + reverse KL add
    λ·(1 + 0) per answer: the first logged loss is SPPO's plus 2λ."""
    data = write_parquet(tmp_path / "p" / "train_prefs.parquet", _sppo_rows())
    first = {}
    for name, extra in (("plain", []), ("rspo", ["--kl_coef", "0.25", "--base_model",
                                                  str(tiny_model_dir)])):
        out = tmp_path / name
        assert main(["train", "--model", str(tiny_model_dir), "--dataset", str(data.parent),
                     "--output_dir", str(out), "--loss_type", "sppo", "--max_steps", "1",
                     "--per_device_train_batch_size", "3", "--logging_steps", "1",
                     "--report_to", "none", *extra]) == 0
        first[name] = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])["loss"]
    assert first["rspo"] == pytest.approx(first["plain"] + 0.5, abs=1e-5)


def method_args(model_dir, out, method, *extra):
    return ["run", "--method", method, "--model", str(model_dir), "--output_dir", str(out),
            "--max_prompts", "6",
            "--tasks_validation_size", "5", "--tasks_test_size", "4", "--max_new_tokens", "6",
            "--per_device_train_batch_size", "3", "--learning_rate", "1e-3",
            "--warmup_ratio", "0", "--logging_steps", "1", "--report_to", "none",
            "--select_on", "validation", *extra]


# Each method, regularized where it can be, chosen on validation.
SAMPLED = ["--judge", "stand_in_judges:by_length", "--num_samples", "3"]
RUNS = {"dpo": [*SAMPLED, "--kl_coef", "0.01"],
        "spin": ["--num_iterations", "3", "--ref_mixture", "0.5", "--kl_coef", "0.01",
                 "--opponent_history", "2"],
        "sppo": [*SAMPLED, "--kl_coef", "0.01", "--kl_type", "forward"]}


_FINISHED: dict = {}


def finished(method, model_dir, tmp_path_factory):
    """The tiny run of `method` (RUNS), made once per session: its directory and arguments."""
    if method not in _FINISHED:
        out = tmp_path_factory.mktemp(method) / "run"
        args = method_args(model_dir, out, method, *RUNS[method])
        assert main(args) == 0
        _FINISHED[method] = out, args
    return _FINISHED[method]


@pytest.mark.parametrize("method", sorted(RUNS))
def test_each_method_runs_and_chooses_on_validation(method, tiny_model_dir, tmp_path_factory,
                                                   capsys):
    out, args = finished(method, tiny_model_dir, tmp_path_factory)
    m = json.loads((out / "manifest.json").read_text())
    assert list(m["stages"])[-1] == "best/evaluate"
    assert json.loads((out / "iter0" / "eval.json").read_text())["split"] == "validation"
    sel = json.loads((out / "best" / "selection.json").read_text())
    assert sel["test"]["split"] == "test" and sel["verdicts"][0]["name"] == "start"
    chosen = sel["path"]
    # best/ holds the chosen model's files, linked (no copy) where the chosen one is a directory
    assert os.path.samefile(out / "best" / "model.safetensors",
                            os.path.join(chosen, "model.safetensors"))
    theta0 = json.loads((out / "test" / "theta0_eval.json").read_text())
    assert theta0["split"] == "test" and theta0["n"] == 4
    report = (out / "report.md").read_text()
    assert "## The best model, chosen on validation" in report and f"Chosen: **{sel['best']}**" \
        in report
    capsys.readouterr()
    assert main(args) == 0                                   # resumed: nothing redone
    assert capsys.readouterr().err.count("done; skipped") == len(m["stages"])


def test_iterative_dpo_pairs_best_against_worst(tiny_model_dir, tmp_path_factory):
    out, _ = finished("dpo", tiny_model_dir, tmp_path_factory)
    pairs = pq.read_table(out / "iter0" / "pairs" / "train_prefs-00000-of-00001.parquet")
    rows = pairs.to_pylist()
    assert {"chosen", "rejected", "chosen_probs"} <= set(pairs.column_names)
    ranked = [json.loads(x) for x in next((out / "iter0" / "ranked").glob("*.jsonl"))
              .read_text().splitlines()]
    by_id = {r["prompt_id"]: r for r in ranked}
    for p in rows:           # the judge's best sample against its worst (longest, shortest)
        lengths = [len(x) for x in by_id[p["prompt_id"]]["responses"]]
        assert len(p["chosen"][-1]["content"]) == max(lengths)
        assert len(p["rejected"][-1]["content"]) == min(lengths)
    log = json.loads((out / "iter0" / "model" / "train_log.jsonl").read_text().splitlines()[0])
    assert "rewards/chosen" in log
    conv = json.loads((out / "iter0" / "pairs" / "convert_report.json").read_text())
    n = conv["splits"]["train"]
    assert n["pairs"] + n["all_tie_prompts_left_out"] == 6


def test_trl_reads_the_dpo_pairs(tiny_model_dir, tmp_path_factory, tmp_path):
    """TRL's DPOTrainer takes the pair files as they are: its prompt is the chat's prompt, its
    completions the answers alone (a `prompt` column beside whole chats gave it the prompt
    twice), and it trains on them."""
    pytest.importorskip("trl")
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    out, _ = finished("dpo", tiny_model_dir, tmp_path_factory)
    files = str(out / "iter0" / "pairs" / "train_prefs-00000-of-00001.parquet")
    rows = load_dataset("parquet", data_files=files, split="train")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    args = DPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2,
                     report_to=[], use_cpu=True, bf16=False, save_strategy="no")
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args,
                         train_dataset=rows, processing_class=tok)
    assert len(trainer.train_dataset) == len(rows) > 0
    for row, ex in zip(rows, trainer.train_dataset):
        prompt = tok.apply_chat_template(row["chosen"][:-1], add_generation_prompt=True,
                                         tokenize=False)
        assert tok.decode(ex["prompt_ids"]) == prompt
        for side in ("chosen", "rejected"):
            text = tok.decode(ex[f"{side}_ids"])
            assert text.startswith(row[side][-1]["content"])
            assert row[side][0]["content"] not in text             # the prompt not repeated
    assert trainer.train().training_loss > 0


def test_regularized_spin_draws_opponents_and_mixes_theta0(tiny_model_dir, tmp_path_factory):
    out, _ = finished("spin", tiny_model_dir, tmp_path_factory)
    conv = json.loads((out / "iter1" / "pairs" / "convert_report.json").read_text())
    assert 0 < conv["splits"]["train"]["earlier_opponents"] <= 6
    assert "earlier_opponents" not in json.loads(
        (out / "iter0" / "pairs" / "convert_report.json").read_text())["splits"]["train"]
    # From iteration 1 on θ_0 is not θ_t: its log-probs were computed, and differ.
    base = json.loads((out / "iter1" / "model" / "base_logps.json").read_text())
    ref = json.loads((out / "iter1" / "model" / "reference_logps.json").read_text())
    assert len(base["chosen"]) == len(ref["chosen"]) and base["chosen"] != ref["chosen"]
    assert not (out / "iter0" / "model" / "base_logps.json").exists()   # θ_0 = θ_t there


def test_prompts_without_a_pair_are_counted(tiny_model_dir, tmp_path, capsys):
    """A judge that ties all samples of some prompts (the rule judge: all right or all wrong)
    leaves those prompts without a pair: said on stderr and in the report."""
    out = tmp_path / "run"
    args = method_args(tiny_model_dir, out, "dpo", "--judge", "stand_in_judges:tie_on_odd",
                       "--num_samples", "3", "--num_iterations", "1")
    assert main(args) == 0
    n = json.loads((out / "iter0" / "pairs" / "convert_report.json").read_text())["splits"][
        "train"]
    assert 0 < n["all_tie_prompts_left_out"] < 6 and n["pairs"] == 6 - n["all_tie_prompts_left_out"]
    assert (f"iteration 0: {n['all_tie_prompts_left_out']} of 6 prompts give no pair: the judge "
            "tied all their samples") in capsys.readouterr().err
    assert f"| iteration 0 | 6 | {n['pairs']} | " in (out / "report.md").read_text()


def test_compare_every_arm_from_one_theta0(tiny_model_dir, tmp_path_factory, tmp_path):
    """The three methods' runs share θ_0 (the tiny model) and validation prompts: one table,
    each arm's updates, and each chosen model read on test against θ_0 and the first arm's."""
    runs = [str(finished(m, tiny_model_dir, tmp_path_factory)[0]) for m in ("spin", "dpo", "sppo")]
    out = tmp_path / "cmp"
    assert main(["compare", *runs, "--output_dir", str(out)]) == 0
    page = (out / "compare.md").read_text()
    spin, dpo, sppo = (f"{m}0/run ({m})" for m in ("spin", "dpo", "sppo"))
    assert "on the same validation prompts" in page
    assert f"| step | {spin} | {dpo} | {sppo} | {dpo} − {spin} | {sppo} − {spin} |" in page
    assert "| arm | updates per iteration | stage time |" in page
    # 6 pairs at batch 3; SPIN from iteration 1 on: previous + current pairs
    assert f"| {spin} | 2, 4, 4 |" in page and f"| {dpo} | 2, 2 |" in page
    chosen = page[page.index("## Each arm's model chosen on validation"):]
    assert chosen.count("| start | 0.0% (0.0–49.0) | 0.0% (0.0–49.0) | +0.0 pts") == 3
    assert f"| chosen − {spin}'s |" in chosen


def test_the_control_arm_takes_max_steps(tiny_model_dir, tmp_path):
    """--max_steps sets every arm's updates per iteration, the SFT control arm's too (before:
    its SFT settings dropped it and it trained by epochs)."""
    out = tmp_path / "ctrl"
    assert main(["run", "--method", "sft", "--model", str(tiny_model_dir), "--output_dir",
                 str(out), "--max_prompts", "6", "--tasks_test_size", "4", "--max_new_tokens",
                 "6", "--per_device_train_batch_size", "3", "--max_steps", "5",
                 "--num_iterations", "1", "--report_to", "none"]) == 0
    done = json.loads((out / "iter0" / "model" / "training_complete.json").read_text())
    assert done["steps"] == 5


def copy_of_finished(method, model_dir, tmp_path_factory, tmp_path):
    """A copy of the tiny run of `method`, to change: its directory and arguments."""
    import shutil
    out, args = finished(method, model_dir, tmp_path_factory)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    return copy, [str(copy) if a == str(out) else a for a in args]


def test_a_forced_patience_change_redoes_only_the_choice(tiny_model_dir, tmp_path_factory,
                                                         tmp_path, capsys):
    copy, args = copy_of_finished("dpo", tiny_model_dir, tmp_path_factory, tmp_path)
    capsys.readouterr()
    assert main(args + ["--patience", "1", "--force"]) == 0
    err = capsys.readouterr().err
    assert "[force] patience changed: redoing best/evaluate" in err
    assert "[best/evaluate] redo (forced recipe change)" in err
    # patience 1 stops after iteration 0, which gained nothing: the start and its 5 stages
    assert err.count("done; skipped") == 6 and "stopping (--patience)" in err
    assert json.loads((copy / "best" / "selection.json").read_text())["stopped_early"]


def test_a_run_given_other_iterations_chooses_again(tiny_model_dir, tmp_path_factory, tmp_path,
                                                    capsys):
    """Cut or extended with --num_iterations (--force), a --select_on run chooses among the
    models it now has (before: the choice among the old ones was kept as done)."""
    copy, args = copy_of_finished("dpo", tiny_model_dir, tmp_path_factory, tmp_path)
    for n, names in ((1, ["start", "iteration 0"]),
                     (3, ["start", "iteration 0", "iteration 1", "iteration 2"])):
        capsys.readouterr()
        assert main(args + ["--num_iterations", str(n), "--force"]) == 0
        err = capsys.readouterr().err
        assert "[best/evaluate] redo (its inputs were start, iteration 0" in err
        sel = json.loads((copy / "best" / "selection.json").read_text())
        assert [v["name"] for v in sel["verdicts"]] == names
    assert "[iter1/train] done; skipped" in err and "[iter2/train] start" in err
