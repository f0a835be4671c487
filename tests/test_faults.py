"""Faults a demanding user meets: nothing of theirs lost, nothing false saved, every mistake
one sentence. Each case failed before these rules (issue: "Nothing lost, nothing false")."""

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import kill_after_first_checkpoint, write_jsonl, write_parquet
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

    from conftest import make_tiny_model
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


@pytest.mark.parametrize("args,message", [
    (["--beta", "inf"], "--beta got 'inf', but it takes a finite number"),
    (["--learning_rate", "nan"], "--learning_rate got 'nan', but it takes a finite number"),
    (["--beta", "0.1", "--beta", "0.2"], "--beta is given twice ('0.1' and '0.2')"),
    (["--max_steps", "-3"], "--max_steps must be 0"),
])
def test_numeric_options_are_checked(args, message, capsys):
    assert main(["train", *args]) == 2
    assert message in capsys.readouterr().err


def test_an_unusable_output_path_fails_before_the_work(tiny_model_dir, tmp_path, capsys):
    blocker = tmp_path / "eval_out"
    blocker.write_text("a file where a directory should be")
    t = time.perf_counter()
    assert main(["evaluate", "--model", str(tiny_model_dir), "--tasks_test_size", "8",
                 "--output_dir", str(blocker)]) == 2
    captured = capsys.readouterr()
    assert "is a file, not a directory" in captured.err
    assert "evaluate model" not in captured.err              # no evaluation was started
    assert time.perf_counter() - t < 5


def test_no_unactionable_import_warnings(tmp_path):
    # bitsandbytes (through peft) logs a missing optional kernel package on AVX512-BF16 CPUs
    code = ("from selfplay.cli import main; import sys; "
            f"main(['tasks', 'export', {str(tmp_path / 'x')!r}, '--n', '6']); "
            "import peft, selfplay.stages.train")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "kernels" not in r.stderr and "Warning" not in r.stderr, r.stderr


def test_non_utf8_rows_are_named_and_can_be_skipped(tmp_path, capsys):
    from selfplay.data.formats import read_examples
    good = json.dumps({"prompt": "Say hi.", "completion": "Hi."})
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + good.encode() + b"\n" + b'{"prompt": "caf\xe9"}\n'
                     + good.replace("hi", "yo").encode() + b"\n")
    with pytest.raises(Exception, match=r"mixed\.jsonl.*row 2.*not UTF-8 text \(byte 15"):
        read_examples(str(path))
    res = read_examples(str(path), skip_bad_rows=True)          # the BOM is not a bad row
    assert [e.reference for e in res.examples] == ["Hi.", "Hi."] and len(res.skipped) == 1
    whole = tmp_path / "latin1.json"
    whole.write_bytes(b'[{"prompt": "caf\xe9", "completion": "x"}]')
    with pytest.raises(Exception, match=r"latin1\.json: not UTF-8 text \(byte 16\)"):
        read_examples(str(whole))


def test_a_data_file_given_as_a_model_is_named(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    assert main(["evaluate", "--model", str(data), "--tasks_test_size", "4",
                 "--output_dir", str(tmp_path / "out")]) == 2
    assert f"model {data} is a file, not a model" in capsys.readouterr().err


def test_a_missing_dataset_fails_at_once_when_the_hub_is_unreachable(tmp_path):
    # a dataset name that is no local path goes to the hub; unreachable, datasets retried for
    # half a minute before the error; now: the local cache only, and one sentence
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9"}   # nothing listens on port 9
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("HF_DATASETS_OFFLINE", None)
    r = subprocess.run([sys.executable, "-m", "selfplay", "generate", "--dataset", "pairs",
                        "--output_dir", str(tmp_path / "out")], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "dataset 'pairs' split 'train' is neither a local file or directory nor a cached " \
           "hub dataset, and the hub cannot be reached" in r.stderr
    # no request retried against the unreachable hub (each retry logged "thrown while
    # requesting HEAD ...", five of them, 38 s)
    assert "Traceback" not in r.stderr and "thrown while requesting" not in r.stderr


def _generate(model, data, out, *extra, tokens="4", batch="4"):
    return main(["generate", "--model", str(model), "--dataset", str(data), "--output_dir",
                 str(out), "--max_new_tokens", tokens, "--batch_size", batch, *extra])


def test_a_shard_made_otherwise_is_never_reused_silently(tiny_model_dir, tmp_path, capsys):
    from conftest import write_jsonl
    data = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt_id": f"p{i}", "messages": [{"role": "user", "content": f"Say {i}."},
                                             {"role": "assistant", "content": f"{i}"}]}
        for i in range(6)])
    out = tmp_path / "gen"
    shard = out / "train-frac00000-rank000-of001.jsonl"
    assert _generate(tiny_model_dir, data, out) == 0
    good = shard.read_bytes()
    # other settings: refused with the keys that differ, the shard untouched
    assert _generate(tiny_model_dir, data, out, tokens="6") == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "max_new_tokens 4 -> 6" in err and "--overwrite" in err
    assert shard.read_bytes() == good
    # how it was made (batch size) does not matter: reused
    assert _generate(tiny_model_dir, data, out, batch="2") == 0
    assert "is complete; skipping it" in capsys.readouterr().err
    # truncated (a copy cut mid-row) or holding other prompts: ours and incomplete, so redone
    shard.write_bytes(good[:len(good) // 2 + 7])        # mid-row
    assert _generate(tiny_model_dir, data, out) == 0
    assert "is unreadable" in capsys.readouterr().err
    assert shard.read_bytes() == good
    shard.write_bytes(b"".join(good.splitlines(keepends=True)[:3]))
    assert _generate(tiny_model_dir, data, out) == 0
    assert "holds 3 rows, not the 6 prompts" in capsys.readouterr().err
    assert shard.read_bytes() == good


def test_a_corrupt_shard_is_one_sentence_in_convert(tmp_path, capsys):
    shards = tmp_path / "gen"
    shards.mkdir()
    (shards / "train-frac00000-rank000-of001.jsonl").write_text('{"prompt_id": "p0", "pro')
    assert main(["convert", "--input_dir", str(shards), "--output_dir", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "line 1: not a JSON row" in err and "truncated or corrupt" in err
    assert "Traceback" not in err


def test_the_same_prompts_in_two_layouts_are_read_once(tiny_model_dir, tmp_path, capsys):
    from selfplay.data.formats import prompt_hash, read_examples
    d = tmp_path / "mixed"
    u = [{"role": "user", "content": f"Say {i}."} for i in range(4)]
    write_jsonl(d / "a.jsonl", [{"prompt_id": f"p{i}", "messages": [
        u[i], {"role": "assistant", "content": f"{i}"}]} for i in range(4)])
    # the same prompts and answers as prompt/completion, and one prompt with another answer
    write_parquet(d / "b.parquet", [{"prompt": f"Say {i}.", "completion": f"{i}"}
                                    for i in range(4)] + [{"prompt": "Say 0.", "completion": "0!"}])
    assert _generate(tiny_model_dir, d, tmp_path / "gen", tokens="2") == 0
    err = capsys.readouterr().err
    assert "read 5 examples" in err                  # not 9 under two ids each
    assert (f"5 rows repeat a prompt read before (first: {d / 'b.parquet'} row 1, the prompt of "
            f"{d / 'a.jsonl'} row 1): 4 with the same answer dropped") in err
    assert "1 with another answer kept" in err
    rows = [json.loads(x) for x in
            (tmp_path / "gen" / "train-frac00000-rank000-of001.jsonl").read_text().splitlines()]
    assert [r["prompt_id"] for r in rows] == [prompt_hash([m]) for m in u + u[:1]]
    assert [r["extra"].get("source_prompt_id") for r in rows] == ["p0", "p1", "p2", "p3", None]
    # the same prompt has the same id in any layout (here SPIN's published one)
    spin = write_parquet(tmp_path / "spin.parquet", [
        {"real": [u[2], {"role": "assistant", "content": "2"}],
         "generated": [u[2], {"role": "assistant", "content": "two"}]}])
    assert read_examples(str(spin)).examples[0].prompt_id == rows[2]["prompt_id"]


@pytest.mark.parametrize("command", ["generate", "score", "convert", "rank", "sft", "train",
                                     "evaluate", "run", "compare", "tasks"])
def test_every_output_path_is_checked_before_the_work(tmp_path, capsys, command):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    cases = [(blocker, "is a file, not a directory"),
             (blocker / "sub", "cannot be written (Not a directory)")]
    if os.geteuid():                # root writes anywhere: a read-only directory needs a user
        (tmp_path / "ro").mkdir(mode=0o555)
        cases.append((tmp_path / "ro", "cannot be written (Permission denied)"))
    for out, message in cases:
        args = {"compare": ["compare", str(tmp_path), str(tmp_path), "--output_dir", str(out)],
                "tasks": ["tasks", "export", str(out), "--n", "6"]}.get(
            command, [command, "--output_dir", str(out)])
        assert main(args) == 2
        option = "OUT" if command == "tasks" else "--output_dir"
        assert f"{option} {out} {message}" in capsys.readouterr().err
    assert blocker.read_text() == "mine"


def test_a_run_directory_that_cannot_take_the_report_is_named(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "base").mkdir(parents=True)
    (run / "base" / "eval.json").write_text("{}")
    (run / "plots").write_text("not a directory")
    assert main(["report", str(run)]) == 2
    assert f"RUN_DIR/plots {run / 'plots'} is a file, not a directory" in capsys.readouterr().err
    assert (run / "plots").read_text() == "not a directory"


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


def test_a_prompt_longer_than_max_prompt_length_is_cut_as_training_cuts_it(tiny_model_dir,
                                                                           tmp_path, capsys):
    from selfplay.rendering import generation_prompt, truncate
    # for a response of max_new_tokens, generation keeps exactly the prompt training keeps
    for n in (10, 40, 60, 100):
        p, r = list(range(n)), [7] * 16
        assert generation_prompt(p, 16, 64, 32) == truncate(p, r, 64, 32).input_ids[:-16]
    long = "Tell me about this. " * 40
    data = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": [{"role": "user", "content": c}, {"role": "assistant", "content": "ok"}]}
        for c in ("Say 1.", long, "Say 2.")])
    out = tmp_path / "gen"
    cut = ["--max_length", "64", "--max_prompt_length", "32"]
    assert _generate(tiny_model_dir, data, out, *cut) == 0
    assert ("1 of 3 prompts are longer than --max_prompt_length 32 tokens, and with "
            "--max_new_tokens 4 would pass --max_length 64: each is answered from its last 32 "
            "tokens, as training truncates it.") in capsys.readouterr().err
    shard = out / "train-frac00000-rank000-of001.jsonl"
    made = shard.read_bytes()
    assert json.loads(made.splitlines()[0])["settings"]["prompt_truncation"] == \
        {"max_length": 64, "max_prompt_length": 32}
    # a shard whose prompts were cut otherwise is not reused silently
    assert _generate(tiny_model_dir, data, out, "--max_length", "64",
                     "--max_prompt_length", "48") == 2
    assert "prompt_truncation" in capsys.readouterr().err and shard.read_bytes() == made


def test_empty_generated_answers_are_counted_in_convert(tmp_path, capsys):
    from selfplay.data.shards import shard_name
    from selfplay.io import write_jsonl_atomic
    gen = tmp_path / "gen"
    rows = [{"prompt_id": f"p{i}", "prompt": [{"role": "user", "content": f"Q{i}?"}],
             "reference": f"A{i}.", "responses": [["gen", ""][i % 2]], "response_tokens": [1],
             "finish_reasons": ["eos"], "extra": {}} for i in range(4)]
    write_jsonl_atomic(gen / shard_name("train", 0, 0, 1), rows)
    assert main(["convert", "--input_dir", str(gen), "--output_dir", str(tmp_path / "p")]) == 0
    assert "4 pairs from 1 shards, 0.0% generations cut by the token limit, 2 with an empty " \
           "generated answer (kept: it is what θ_t answered)" in capsys.readouterr().out
    rep = json.loads((tmp_path / "p" / "convert_report.json").read_text())["splits"]["train"]
    assert rep["empty_responses"] == 2


def test_sppo_columns_under_a_pair_loss_are_named(tiny_model_dir, tmp_path, capsys):
    u = [{"role": "user", "content": f"Say a word with {i + 3} letters."} for i in range(4)]
    data = tmp_path / "synthetic_data_score"
    write_parquet(data / "train.parquet", [
        {"chosen": [m, {"role": "assistant", "content": "x" * (i + 3)}],
         "rejected": [m, {"role": "assistant", "content": "no"}], "chosen_probs": 0.8,
         "chosen_probs_win": 0.7, "chosen_probs_lose": 0.3} for i, m in enumerate(u)])
    assert _train(tiny_model_dir, data, tmp_path / "out", "--max_steps", "1") == 0
    assert (f"warning: {data} holds SPPO win probabilities (chosen_probs, chosen_probs_win, "
            "chosen_probs_lose), which --loss_type sigmoid ignores; --loss_type sppo trains on "
            "them.") in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# Kill -9 at a random point, then the same command again: the same outputs as a run that was
# never interrupted, no row twice, nothing of the user's touched. (generate, train, sft and
# run have theirs beside them: tests/test_generate.py, test_training.py, test_sft.py,
# test_loop.py.)
# ---------------------------------------------------------------------------------------

def _shards(d, n_shards=3, rows=200):
    """Generation shards as `selfplay generate --data_frac i` writes them, K = 2 answers."""
    from selfplay.data.shards import ShardRow, shard_name, write_shard
    for f in range(n_shards):
        write_shard(d / shard_name("train", f, 0, 1), [
            ShardRow(prompt_id=f"p{f}-{i}",
                     prompt=[{"role": "user", "content": f"Add {i} and {f}."}],
                     reference=f"{i} + {f} = {i + f}.",
                     responses=[f"{i + f}", f"It is {i + f + 1}."],
                     response_tokens=[2, 6], finish_reasons=["stop", "stop"],
                     settings={"model": "m", "max_new_tokens": 8})
            for i in range(rows)])
    return d


def _outputs(out, command):
    """What a command made, comparable across output directories."""
    if command == "evaluate":
        r = json.loads((out / "eval.json").read_text())
        return {"rows": r["rows"], "accuracy": r["accuracy"]}
    if command == "convert":
        import pyarrow.parquet as pq
        report = json.loads((out / "convert_report.json").read_text())
        report["splits"]["train"].pop("file")
        return {"pairs": pq.read_table(out / "train_prefs-00000-of-00001.parquet").to_pylist(),
                "report": report}
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.jsonl"))}


def _tree(d):
    return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command", ["score", "rank", "convert", "evaluate"])
def test_a_command_killed_anywhere_reruns_to_the_same_outputs(command, tiny_model_dir, tmp_path):
    import numpy as np
    from conftest import kill_at_random_point, seconds_after
    shards = _shards(tmp_path / "gen", rows=2000 if command == "convert" else 200)
    args, marker = {
        "score": (["score", "--model", str(tiny_model_dir), "--dataset", str(shards)], "score"),
        "rank": (["rank", "--input_dir", str(shards), "--judge", "stand_in_judges:slow_by_length"],
                 "rank train-frac"),
        "convert": (["convert", "--input_dir", str(shards)], "convert train"),
        "evaluate": (["evaluate", "--model", str(tiny_model_dir), "--tasks_test_size", "96",
                      "--eval_max_new_tokens", "24", "--batch_size", "8"], "evaluate model"),
    }[command]
    inputs = _tree(shards)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    span = seconds_after([*args, "--output_dir", str(whole)], marker)
    cut.mkdir()
    (cut / "notes.txt").write_text("mine")                 # the user's file beside our outputs
    rng = np.random.default_rng(sum(map(ord, command)))    # a random point, the same each time
    kill_at_random_point([*args, "--output_dir", str(cut)], marker, 0.8 * span, rng)
    assert main([*args, "--output_dir", str(cut)]) == 0
    assert _outputs(cut, command) == _outputs(whole, command)
    rows = [r for f in cut.glob("*.jsonl") for r in f.read_text().splitlines()]
    ids = [json.loads(r)["prompt_id"] for r in rows]
    assert len(ids) == len(set(ids))                       # no row twice
    assert (cut / "notes.txt").read_text() == "mine" and _tree(shards) == inputs
