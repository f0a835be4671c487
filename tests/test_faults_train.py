"""Faults of `train` (and `sft`): a user's directory, interrupted runs, NaN, broken models.

Nothing of the user's lost, nothing false saved, every mistake one sentence: each case failed
before these rules (issue: "Nothing lost, nothing false")."""

import json

import pytest

from helpers import interrupted_training, kill_after_first_checkpoint, write_parquet
from selfplay.cli import main


def _pairs(n=8):
    u = lambda i: {"role": "user", "content": f"What is {i} plus {i}?"}  # noqa: E731
    return [{"prompt_id": f"p{i}", "real": [u(i), {"role": "assistant", "content": f"{2 * i}"}],
             "generated": [u(i), {"role": "assistant", "content": f"Maybe {i}."}]}
            for i in range(n)]


@pytest.fixture
def pairs_dir(tmp_path):
    write_parquet(tmp_path / "pairs" / "train_prefs-00000-of-00001.parquet", _pairs())
    return tmp_path / "pairs"


def _train(model, data, out, *extra):
    return main(["train", "--model", str(model), "--dataset", str(data), "--output_dir",
                 str(out), "--per_device_train_batch_size", "4", "--logging_steps", "1",
                 "--learning_rate", "1e-3", *extra])


def test_overwrite_never_deletes_a_users_directory(tiny_model_dir, tmp_path, capsys):
    mine = tmp_path / "my_work"
    mine.mkdir()
    (mine / "notes.txt").write_text("three weeks of notes")
    # a bad dataset: fails on its input, before anything is touched
    assert _train(tiny_model_dir, tmp_path / "missing.jsonl", mine, "--overwrite") == 2
    assert (mine / "notes.txt").read_text() == "three weeks of notes"
    # a good dataset: the directory is not ours, so it is refused, not emptied
    write_parquet(tmp_path / "p" / "train_prefs-00000-of-00001.parquet", _pairs())
    assert _train(tiny_model_dir, tmp_path / "p", mine, "--overwrite") == 2
    assert "holds files that selfplay did not write (notes.txt)" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "three weeks of notes"


def test_overwrite_clears_our_own_output(tiny_model_dir, pairs_dir, tmp_path):
    out = tmp_path / "out"
    assert _train(tiny_model_dir, pairs_dir, out, "--max_steps", "1") == 0
    assert (out / ".selfplay-output").exists()
    assert _train(tiny_model_dir, pairs_dir, out, "--max_steps", "2", "--overwrite") == 0
    assert json.loads((out / "training_complete.json").read_text())["steps"] == 2


def _cut_training(model, data, out):
    """A training killed after its first checkpoint: its command and the checkpoints kept."""
    args = ["train", "--model", str(model), "--dataset", str(data), "--output_dir", str(out),
            "--per_device_train_batch_size", "2", "--max_steps", "40", "--save_steps", "2",
            "--learning_rate", "1e-3"]
    kill_after_first_checkpoint(args, out)
    return args, sorted(p.name for p in (out / "checkpoints").iterdir())


def test_interrupted_training_is_kept_until_told(tiny_model_dir, pairs_dir, tmp_path, capsys):
    out = tmp_path / "cut"
    args, kept = _cut_training(tiny_model_dir, pairs_dir, out)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "interrupted training" in err and "--resume" in err and "--overwrite" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == kept
    assert main(args + ["--resume"]) == 0
    assert json.loads((out / "training_complete.json").read_text())["steps"] == 40


def test_resuming_under_other_options_is_refused(tiny_model_dir, pairs_dir, tmp_path, capsys):
    out = tmp_path / "cut"
    args, kept = _cut_training(tiny_model_dir, pairs_dir, out)
    changed = [a if a != "1e-3" else "1e-4" for a in args] + ["--beta", "0.5", "--resume"]
    assert main(changed) == 2
    err = capsys.readouterr().err
    assert "was made with other options (beta 0.1 -> 0.5; learning_rate 0.001 -> 0.0001)" in err
    assert "--overwrite" in err and "nothing was deleted" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == kept
    assert main(args + ["--resume", "--logging_steps", "5"]) == 0   # logging is not the recipe


@pytest.fixture
def broken_model_dir(tmp_path, tokenizer):
    """A checkpoint with one non-finite weight: every loss it gives is NaN."""
    import torch

    from helpers import make_tiny_model
    model = make_tiny_model(tokenizer)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    d = tmp_path / "broken"
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.mark.parametrize("command", ["train", "sft"])
def test_a_diverging_run_stops_and_saves_nothing_as_complete(broken_model_dir, pairs_dir,
                                                             tmp_path, capsys, command):
    out = tmp_path / "nan"
    rc = main([command, "--model", str(broken_model_dir), "--dataset", str(pairs_dir),
               "--output_dir", str(out), "--per_device_train_batch_size", "4",
               "--max_steps", "4", "--save_steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "update 1: the loss (nan)" in err and "is not finite" in err
    assert "the last good checkpoint is none" in err and "--learning_rate" in err
    assert not (out / "training_complete.json").exists()
    assert not (out / "model.safetensors").exists() and not (out / "checkpoints").exists()


def _break(d, how):
    if how == "cut":
        w = d / "model.safetensors"
        w.write_bytes(w.read_bytes()[:w.stat().st_size // 2])
        return "model.safetensors holds", "it is cut short"
    if how == "config":
        (d / "config.json").write_text('{"model_type": "llama", ')
        return "config.json is not a JSON object", "corrupt or was cut short"
    if how == "no_weights":
        (d / "model.safetensors").unlink()
        return "holds config.json but no weights", "the checkpoint is incomplete"
    t = d / "tokenizer.json"
    t.write_bytes(t.read_bytes()[:1000])
    return "cannot be loaded (Expecting value", "incomplete or corrupt"


@pytest.mark.parametrize("how", ["cut", "config", "no_weights", "tokenizer"])
def test_a_broken_checkpoint_is_one_sentence(tiny_model_dir, pairs_dir, tmp_path, capsys, how):
    import shutil
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, d)
    words = _break(d, how)
    files = {p.name: p.read_bytes() for p in d.iterdir()}
    for args in (["evaluate", "--model", str(d), "--tasks_test_size", "4", "--output_dir",
                  str(tmp_path / "eval")],
                 ["train", "--model", str(d), "--dataset", str(pairs_dir), "--output_dir",
                  str(tmp_path / "train"), "--max_steps", "1"]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"model {d}" in err and all(w in err for w in words), err
    assert {p.name: p.read_bytes() for p in d.iterdir()} == files      # nothing touched


def test_sppo_columns_under_a_pair_loss_are_named(tiny_model_dir, tmp_path, capsys):
    u = [{"role": "user", "content": f"Say a word with {i + 3} letters."} for i in range(4)]
    data = tmp_path / "synthetic_data_score"
    write_parquet(data / "train.parquet", [
        {"chosen": [m, {"role": "assistant", "content": "x" * (i + 3)}],
         "rejected": [m, {"role": "assistant", "content": "no"}], "chosen_probs": 0.8,
         "chosen_probs_win": 0.7, "chosen_probs_lose": 0.3} for i, m in enumerate(u)])
    assert _train(tiny_model_dir, data, tmp_path / "out", "--max_steps", "1") == 0
    assert (f"{data} holds SPPO win probabilities (chosen_probs, chosen_probs_win, "
            "chosen_probs_lose), which --loss_type sigmoid does not read: it trains the best "
            "answer against the worst, as iterative DPO (--loss_type sppo trains on them).") \
        in capsys.readouterr().err


def test_a_learning_rate_that_is_surely_a_typo_is_refused(tiny_model_dir, pairs_dir, tmp_path,
                                                         capsys):
    """1e5 for 1e-5 (before: the default model trained at it, loss 0.69 -> 4.53 -> 2.19,
    and was saved as complete)."""
    assert main(["train", "--model", str(tiny_model_dir), "--dataset", str(pairs_dir),
                 "--output_dir", str(tmp_path / "x"), "--learning_rate", "1e5"]) == 2
    err = capsys.readouterr().err
    assert "--learning_rate 100000 is above 0.01" in err and "did you mean 1e-05?" in err
    assert "--allow_large_lr" in err and not (tmp_path / "x" / "train_log.jsonl").exists()
    assert main(["run", "--sft_epochs", "1", "--sft_learning_rate", "0.5", "--use_peft",
                 "--output_dir", str(tmp_path / "r")]) == 2
    assert "--sft_learning_rate 0.5 is above 0.1, the most any LoRA" in capsys.readouterr().err


def test_a_diverging_loss_stops_the_training(tiny_model_dir, tmp_path, capsys):
    """A learning rate too large to be caught as a typo (allowed here): the loss of updates
    11-20 averages more than 3 times that of 1-10, and training stops there, nothing saved
    as complete, as the non-finite check stops."""
    out = tmp_path / "div"
    assert main(["sft", "--model", str(tiny_model_dir), "--max_prompts", "64", "--output_dir",
                 str(out), "--learning_rate", "1.0", "--warmup_ratio", "0.9",
                 "--allow_large_lr", "--max_steps", "40", "--per_device_train_batch_size", "2",
                 "--logging_steps", "1", "--optim", "rmsprop", "--report_to", "none"]) == 2
    err = capsys.readouterr().err
    assert "update 20: the loss of the last 10 updates" in err and "training diverges" in err
    assert not (out / "training_complete.json").exists()
    assert not (out / "model.safetensors").exists()


@pytest.mark.slow          # two trainings killed and resumed: 45 s on 2 cores
def test_a_lost_reference_cache_is_recomputed_only_where_it_can_be(tiny_model_dir, tokenizer,
                                                                  pairs_dir, tmp_path, capsys):
    """Resumed with checkpoints but no reference_logps.json: a reference that is the starting
    model has moved with training and cannot be scored again (one sentence); a reference
    loaded for the pass alone (--reference_model, θ_0 of the regularized losses) can."""
    from helpers import make_tiny_model
    other = tmp_path / "theta_t"
    make_tiny_model(tokenizer, seed=1).save_pretrained(other)
    tokenizer.save_pretrained(other)
    for name, extra, code in (("moved", [], 2), ("separate", ["--reference_model", str(other)], 0)):
        out = tmp_path / name
        args = interrupted_training(tiny_model_dir, pairs_dir, out, *extra)
        (out / "reference_logps.json").unlink()
        capsys.readouterr()
        assert main(args + ["--resume"]) == code
        if code:
            assert "has checkpoints but no reference_logps.json" in capsys.readouterr().err
