"""--lm_eval_tasks: lm-evaluation-harness on each evaluated model, offline, on a local task.

The task is our own, defined on a local file (lm-eval's task YAML with local data_files).
"""

import json

import pytest
import torch

from selfplay.cli import main
from test_loop import run_args

pytest.importorskip("lm_eval")

DOCS = [{"question": f"What is {i} plus {i % 7}?",
         "choices": [str(i + i % 7), str(i + i % 7 + 1), "no idea", f"{i}"],
         "label": i % 4} for i in range(12)]


@pytest.fixture
def task_dir(tmp_path):
    d = tmp_path / "tasks"
    d.mkdir()
    (d / "docs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in DOCS))
    (d / "toy_mc.yaml").write_text(f"""task: toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'docs.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return d


def our_logliks(model_dir, tokenizer, doc):
    """log p(" " + choice | context) by a plain forward pass, tokenized as lm-eval does
    (the context's tokens, then the rest of the whole text's)."""
    from transformers import AutoModelForCausalLM
    lm = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    context = f"Question: {doc['question']}\nAnswer:"
    out = []
    for choice in doc["choices"]:
        whole = tokenizer(context + " " + choice, add_special_tokens=False)["input_ids"]
        n_ctx = len(tokenizer(context, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logp = lm(torch.tensor([whole])).logits.log_softmax(-1)[0]
        out.append(sum(logp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole))))
    return out


@pytest.mark.parametrize("which", [
    "tiny", pytest.param("default", marks=[pytest.mark.real_model, pytest.mark.slow])])
def test_evaluate_runs_an_lm_eval_task(which, tiny_model_dir, tokenizer, task_dir, tmp_path):
    from selfplay.models import resolve
    model_dir = tiny_model_dir if which == "tiny" else resolve("default").location
    out = tmp_path / "ev"
    assert main(["evaluate", "--model", str(model_dir), "--tasks_test_size", "6",
                 "--lm_eval_tasks", "toy_mc", "--lm_eval_include", str(task_dir),
                 "--output_dir", str(out)]) == 0
    ev = json.loads((out / "eval.json").read_text())
    got = ev["lm_eval"]
    assert got["n_samples"]["toy_mc"] == len(DOCS) and ev["n"] == 6   # ours ran too
    samples = sorted(got["samples"]["toy_mc"], key=lambda s: s["doc_id"])
    # lm-eval scored the model we loaded: its log-likelihoods are ours on the same tokens
    for s in samples:
        ours = our_logliks(model_dir, tokenizer, DOCS[s["doc_id"]])
        assert [r[0] for r in s["filtered_resps"]] == pytest.approx(ours, abs=1e-4)
    right = [max(range(4), key=lambda j: s["filtered_resps"][j][0]) == DOCS[s["doc_id"]]["label"]
             for s in samples]
    assert got["tasks"]["toy_mc"]["acc"] == pytest.approx(sum(right) / len(right))
    assert got["tasks"]["toy_mc"]["acc_stderr"] > 0


def test_a_misspelt_task_fails_before_the_evaluation(tiny_model_dir, task_dir, tmp_path, capsys):
    assert main(["evaluate", "--model", str(tiny_model_dir), "--lm_eval_tasks", "toy_mcq",
                 "--lm_eval_include", str(task_dir), "--output_dir", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "lm-eval has no task 'toy_mcq' (did you mean 'toy_mc'?)" in err
    assert "evaluate model" not in err and not (tmp_path / "e" / "eval.json").exists()


def test_a_run_reports_lm_eval_per_model(tiny_model_dir, task_dir, tmp_path):
    out = tmp_path / "run"
    assert main(run_args(tiny_model_dir, out, "--num_iterations", "1", "--lm_eval_tasks",
                         "toy_mc", "--lm_eval_include", str(task_dir),
                         "--lm_eval_limit", "5")) == 0
    accs = [json.loads((out / d / "eval.json").read_text())["lm_eval"]["tasks"]["toy_mc"]["acc"]
            for d in ("base", "iter0")]
    report = (out / "report.md").read_text()
    assert "## lm-evaluation-harness" in report and "| model | toy_mc acc |" in report
    assert f"| start | {accs[0]:.4f} ± " in report and f"| iteration 0 | {accs[1]:.4f}" in report
    assert (out / "plots" / "lm_eval.png").stat().st_size > 1000
