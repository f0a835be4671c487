"""`selfplay sft` on the tiny model, and in `selfplay run` (the SFT stage and control arm).

Training, checkpoint, exact resume, LoRA; in `selfplay run`: the SFT stage and the SFT control
arm. Its loss is tested in test_losses.py.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from helpers import kill_after_first_checkpoint, write_jsonl
from selfplay.cli import main
ROWS = [{"prompt_id": f"p{i}", "messages": [
    {"role": "user", "content": f"What is {i} plus {i}?"},
    {"role": "assistant", "content": f"{i} + {i} = {2 * i}.\nAnswer: {2 * i}"}]}
    for i in range(12)]


def _args(model_dir, data, *extra):
    return ["--model", str(model_dir), "--dataset", str(data), "--per_device_train_batch_size",
            "4", "--learning_rate", "3e-3", "--logging_steps", "1", *extra]


def _log(out):
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]


def test_sft_lowers_the_loss_and_saves_a_checkpoint(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d" / "train.jsonl", ROWS)
    out = tmp_path / "sft"
    assert main(["sft", "--output_dir", str(out), *_args(tiny_model_dir, data,
                                                         "--num_train_epochs", "4")]) == 0
    log = _log(out)
    assert len(log) == 12 and log[-1]["loss"] < log[0]["loss"] - 1.0
    done = json.loads((out / "training_complete.json").read_text())
    assert done["steps"] == 12 and done["examples"] == 12
    assert (out / "tensorboard").is_dir() and not (out / "checkpoints").exists()
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size > 0
    # a finished model is kept, not trained again
    assert main(["sft", "--output_dir", str(out), *_args(tiny_model_dir, data)]) == 0
    assert len(_log(out)) == 12


def test_sft_resume_reaches_the_same_weights(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d" / "train.jsonl", ROWS)
    args = _args(tiny_model_dir, data, "--max_steps", "30", "--save_steps", "2")
    full = tmp_path / "full"
    assert main(["sft", "--output_dir", str(full), *args]) == 0
    cut = tmp_path / "cut"
    kill_after_first_checkpoint(["sft", "--output_dir", str(cut), *args], cut)
    assert main(["sft", "--output_dir", str(cut), "--resume", *args]) == 0
    a, b = load_file(full / "model.safetensors"), load_file(cut / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    assert [r["step"] for r in _log(cut)] == list(range(1, 31))


def test_sft_with_lora(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d" / "train.jsonl", ROWS)
    out = tmp_path / "lora"
    assert main(["sft", "--output_dir", str(out), *_args(tiny_model_dir, data, "--use_peft",
                                                         "--lora_r", "4", "--max_steps",
                                                         "3")]) == 0
    m = load_file(out / "model.safetensors")
    assert not any("lora" in k for k in m)               # merged into full weights


def test_sft_refuses_pair_options():
    from selfplay.config import load_config
    from selfplay.errors import SelfplayError
    with pytest.raises(SelfplayError, match="--beta does not apply to `selfplay sft`"):
        load_config("sft", None, ["--beta", "0.5"])
    cfg = load_config("sft")
    assert (cfg.training.optim, cfg.training.learning_rate, cfg.job.output_dir) == \
        ("adamw", 2e-5, "checkpoints/sft")


# ---------------------------------------------------------------------------------------
# In the loop: an SFT stage before iteration 0, and the SFT control arm
# ---------------------------------------------------------------------------------------

def _run(model_dir, out, *extra):
    return main(["run", "--model", str(model_dir), "--output_dir", str(out), "--max_prompts",
                 "6", "--eval_split", "validation", "--tasks_validation_size", "8",
                 "--max_new_tokens", "6",
                 "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
                 "--logging_steps", "1", "--num_iterations", "2", "--sft_epochs", "1",
                 "--sft_max_prompts", "8", "--sft_learning_rate", "1e-3", "--skip_prompts", "8",
                 *extra])


@pytest.fixture(scope="module")
def arms(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("arms")
    assert _run(tiny_model_dir, root / "spin") == 0
    assert _run(tiny_model_dir, root / "sft", "--method", "sft") == 0
    return root


def test_sft_stage_makes_theta_0(arms):
    m = json.loads((arms / "spin" / "manifest.json").read_text())
    assert list(m["stages"])[:3] == ["base/evaluate", "sft/train", "sft/evaluate"]
    done = json.loads((arms / "spin" / "sft" / "model" / "training_complete.json").read_text())
    assert done["examples"] == 8 and done["steps"] == 2          # 8 examples, batch 4, 1 epoch
    shard = next((arms / "spin" / "iter0" / "generated").glob("*.jsonl"))
    assert json.loads(shard.read_text().splitlines()[0])["settings"]["model"] == \
        str(arms / "spin" / "sft" / "model")                  # θ_0 is the SFT model
    # the iterations' prompts are the 6 after the SFT stage's 8: prompts it did not see
    from selfplay.data.formats import read_examples
    train = [e.prompt_id for e in read_examples("builtin:tasks", "train", max_prompts=14).examples]
    assert [json.loads(x)["prompt_id"] for x in shard.read_text().splitlines()] == train[8:]
    sft_eval = json.loads((arms / "spin" / "sft" / "eval.json").read_text())
    assert sft_eval["paired"]["n"] == 8 and len(sft_eval["accuracy_ci95"]) == 2
    assert sft_eval["split"] == "validation"          # --eval_split: choosing, not testing
    report = (arms / "spin" / "report.md").read_text()
    assert "| SFT |" in report and "From start to iteration 1" in report
    assert "From SFT to iteration 1" in report and "2 iteration(s) finished" in report


def test_control_arm_spends_as_many_updates_on_the_same_prompts(arms):
    m = json.loads((arms / "sft" / "manifest.json").read_text())
    assert list(m["stages"]) == ["base/evaluate", "sft/train", "sft/evaluate", "iter0/sft",
                                 "iter0/evaluate", "iter1/sft", "iter1/evaluate"]
    for t in (0, 1):
        spin = json.loads((arms / "spin" / f"iter{t}" / "model" / "training_complete.json")
                          .read_text())
        ctrl = json.loads((arms / "sft" / f"iter{t}" / "model" / "training_complete.json")
                          .read_text())
        assert ctrl["steps"] == spin["steps"]
        assert ctrl["examples"] == 6 and sum(s["pairs"] for s in spin["sources"]) == \
            6 * ctrl["repeat"]                   # iteration 1: previous + current, seen twice
    # the same θ_0: the SFT stage is the same computation in both arms
    a = load_file(arms / "spin" / "sft" / "model" / "model.safetensors")
    b = load_file(arms / "sft" / "sft" / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_compare_the_arms(arms, tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", str(arms / "spin"), str(arms / "sft"), "--output_dir",
                 str(out)]) == 0
    page = (out / "compare.md").read_text()
    assert "spin (spin)" in page and "sft (sft)" in page and "| iteration 1 |" in page
    # lined up at θ_0, the SFT model both arms made the same way: no difference there
    theta0 = next(x for x in page.splitlines() if x.startswith("| θ_0 |"))
    assert "+0.0 pts (0↑ 0↓" in theta0
    assert (out / "compare.png").stat().st_size > 1000
    assert main(["compare", str(arms / "spin")]) == 2        # one arm is no comparison


def test_control_arm_takes_its_updates_from_a_spin_run(arms, tiny_model_dir, tmp_path):
    # --drop_identical can leave SPIN fewer pairs than prompts: the arm then matches the run
    spin = tmp_path / "spin"
    shutil.copytree(arms / "spin", spin)
    for t, steps in ((0, 1), (1, 3)):
        done = spin / f"iter{t}" / "model" / "training_complete.json"
        done.write_text(json.dumps({**json.loads(done.read_text()), "steps": steps}))
    out = tmp_path / "ctrl"
    assert _run(tiny_model_dir, out, "--method", "sft", "--match_steps_of", str(spin)) == 0
    assert [json.loads((out / f"iter{t}" / "model" / "training_complete.json").read_text())
            ["steps"] for t in (0, 1)] == [1, 3]
    (spin / "iter1" / "model" / "training_complete.json").unlink()
    assert _run(tiny_model_dir, tmp_path / "ctrl2", "--method", "sft", "--match_steps_of",
                str(spin)) == 2                 # iteration 1 of that run never finished
    assert _run(tiny_model_dir, tmp_path / "x", "--match_steps_of", str(spin)) == 2  # not SPIN


def test_fresh_prompts_give_each_iteration_the_next_ones(tiny_model_dir, tmp_path):
    out = tmp_path / "fresh"
    assert _run(tiny_model_dir, out, "--fresh_prompts", "true") == 0
    from selfplay.data.formats import read_examples
    train = [e.prompt_id for e in read_examples("builtin:tasks", "train", max_prompts=20).examples]
    for t in (0, 1):      # after the SFT stage's 8 prompts, 6 new ones per iteration
        shard = next((out / f"iter{t}" / "generated").glob("*.jsonl"))
        assert [json.loads(x)["prompt_id"] for x in shard.read_text().splitlines()] == \
            train[8 + 6 * t:14 + 6 * t]
    assert main(["run", "--fresh_prompts", "true", "--max_prompts", "0", "--output_dir",
                 str(tmp_path / "x")]) == 2           # every prompt each time: none left fresh
