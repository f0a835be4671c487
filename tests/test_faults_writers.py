"""Two writers and lost files: one writer per output directory, nothing replaced unasked."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from selfplay.cli import main
from selfplay.io import LOCK_NAME


def test_a_second_writer_is_refused_while_the_first_writes(tiny_model_dir, tmp_path):
    """Two `selfplay generate` into one directory with other settings, the second started
    while the first works: the second fails at once naming the first; the first's shard is
    whole (before: both exited 0 and the shard held the second's rows)."""
    out = tmp_path / "gen"
    args = ["generate", "--model", str(tiny_model_dir), "--output_dir", str(out),
            "--max_prompts", "128", "--tasks_train_size", "128"]
    # the first's work (about 10 s) outlasts the second's imports before it looks (about 3 s)
    first = subprocess.Popen([sys.executable, "-m", "selfplay", *args, "--max_new_tokens", "64"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (out / LOCK_NAME).exists():
        assert first.poll() is None and time.time() < deadline, "the first never took the lock"
        time.sleep(0.02)
    second = subprocess.run([sys.executable, "-m", "selfplay", *args, "--max_new_tokens", "8"],
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 2
    assert f"{out} is being written by another selfplay command (`selfplay generate`, pid " \
        f"{first.pid}" in second.stderr
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    rows = [json.loads(r) for r in (out / "train-frac00000-rank000-of001.jsonl").open()]
    assert len(rows) == 128 and {r["settings"]["max_new_tokens"] for r in rows} == {64}
    assert not (out / LOCK_NAME).exists()


def test_a_lock_left_by_a_dead_process_is_taken_over(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ev"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                             "command": "run", "since": time.time()}))
    assert main(["evaluate", "--model", str(tiny_model_dir), "--output_dir", str(out),
                 "--tasks_test_size", "4", "--max_new_tokens", "4"]) == 0
    err = capsys.readouterr().err
    assert f"taking over the lock of `selfplay run` (pid {dead.pid}), which is no longer " \
        "running" in err
    assert (out / "eval.json").exists() and not (out / LOCK_NAME).exists()


def test_a_lock_held_on_another_machine_is_respected(tiny_model_dir, tmp_path, capsys):
    """A shared filesystem's lock from another host: its process cannot be checked here."""
    out = tmp_path / "shared"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "node-7", "command": "train",
                                             "since": time.time()}))
    assert main(["evaluate", "--model", str(tiny_model_dir), "--output_dir", str(out)]) == 2
    assert "(`selfplay train`, pid 1 on node-7, since" in capsys.readouterr().err
    assert not (out / "eval.json").exists()


def test_an_evaluation_of_another_model_is_not_replaced_unasked(tiny_model_dir, tmp_path,
                                                               capsys):
    out = tmp_path / "eval"
    common = ["--output_dir", str(out), "--tasks_test_size", "4", "--max_new_tokens", "4"]
    assert main(["evaluate", "--model", str(tiny_model_dir), *common]) == 0
    before = (out / "eval.json").read_text()
    other = tmp_path / "copy"
    import shutil
    shutil.copytree(tiny_model_dir, other)
    assert main(["evaluate", "--model", str(other), *common]) == 2
    assert f"holds an evaluation of {tiny_model_dir} on builtin:tasks (test); nothing was " \
        "evaluated: pass --overwrite" in capsys.readouterr().err
    assert (out / "eval.json").read_text() == before
    assert main(["evaluate", "--model", str(other), *common, "--overwrite"]) == 0
    assert json.loads((out / "eval.json").read_text())["model"] == str(other)


def test_tasks_export_keeps_a_users_file(tmp_path, capsys):
    out = tmp_path / "tasks"
    out.mkdir()
    (out / "train.jsonl").write_text('{"mine": 1}\n')
    sizes = ["--tasks_train_size", "5", "--tasks_validation_size", "2", "--tasks_test_size", "3"]
    assert main(["tasks", "export", str(out), *sizes]) == 2
    assert "train.jsonl exists and holds other rows; nothing was written" in \
        capsys.readouterr().err
    assert (out / "train.jsonl").read_text() == '{"mine": 1}\n'
    assert not (out / "test.jsonl").exists()
    assert main(["tasks", "export", str(out), *sizes, "--overwrite"]) == 0
    assert main(["tasks", "export", str(out), *sizes]) == 0     # its own rows: the same again
    assert os.path.getsize(out / "train.jsonl") > 100


def test_a_resume_on_edited_pairs_is_refused(tiny_model_dir, tmp_path, capsys):
    """The pairs edited under an interrupted training, every token count unchanged (digits
    swapped in every real answer): --resume refuses (before: it resumed on a mix of old and
    new data and marked the model complete)."""
    import pyarrow.parquet as pq

    from helpers import interrupted_training, write_parquet
    rows = []
    for i in range(16):
        u = {"role": "user", "content": f"What is {i} plus {i + 1}?"}
        rows.append({"real": [u, {"role": "assistant", "content": f"It is {2 * i + 1}."}],
                     "generated": [u, {"role": "assistant", "content": f"Maybe {i}."}]})
    data = write_parquet(tmp_path / "pairs" / "train_prefs-00000-of-00001.parquet", rows)
    out = tmp_path / "model"
    args = interrupted_training(tiny_model_dir, data.parent, out)
    swap = str.maketrans("0123456789", "9876543210")
    for r in rows:
        r["real"][1]["content"] = r["real"][1]["content"].translate(swap)
    pq.write_table(pq.read_table(data).from_pylist(rows), data)
    assert main(args + ["--resume"]) == 2
    assert "was made on other data" in capsys.readouterr().err
    assert not (out / "training_complete.json").exists()


def test_a_run_whose_dataset_changed_is_refused_unless_forced(tiny_model_dir, tmp_path,
                                                               capsys):
    """A run, the dataset file rewritten with other prompts, the same command again: refused,
    naming the file and --force (before: a resumed run skipped base/evaluate with the old
    prompts and evaluated iter0 with the new, side by side in the report)."""
    data = tmp_path / "data"
    assert main(["tasks", "export", str(data), "--tasks_train_size", "8",
                 "--tasks_validation_size", "2", "--tasks_test_size", "4"]) == 0
    out = tmp_path / "run"
    args = ["run", "--model", str(tiny_model_dir), "--dataset", str(data), "--eval_split",
            "test", "--output_dir", str(out), "--num_iterations", "1", "--max_prompts", "4",
            "--max_new_tokens", "4", "--max_steps", "1", "--per_device_train_batch_size", "2",
            "--report_to", "none"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["tasks", "export", str(data), "--tasks_train_size", "8",
                 "--tasks_validation_size", "2", "--tasks_test_size", "4", "--tasks_seed", "1",
                 "--overwrite"]) == 0
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"was started on other inputs: the dataset '{data}' changed since" in err
    assert "--force" in err
    assert main(args + ["--force"]) == 0
    err = capsys.readouterr().err
    assert "[force] dataset changed: redoing base/evaluate, iter0/generate" in err


def test_a_dataset_without_a_test_split_gives_up_prompts_for_evaluation(tiny_model_dir,
                                                                        tmp_path, capsys):
    """One file, one split: the run holds the prompts with the smallest id hashes out for
    its evaluations, says so first, never trains on them, and the report says what was
    evaluated (before: every evaluation read the rows it trained on, and the report said
    "the held-out split")."""
    data = tmp_path / "data"
    assert main(["tasks", "export", str(data), "--tasks_train_size", "40",
                 "--tasks_validation_size", "2", "--tasks_test_size", "2"]) == 0
    only = data / "train.jsonl"
    out = tmp_path / "run"
    assert main(["run", "--model", str(tiny_model_dir), "--dataset", str(only), "--output_dir",
                 str(out), "--num_iterations", "1", "--max_prompts", "8", "--max_new_tokens",
                 "4", "--max_steps", "1", "--per_device_train_batch_size", "2",
                 "--report_to", "none"]) == 0
    err = capsys.readouterr().err
    assert f"{only} has no test split: 4 of its 40 prompts, those with the smallest id " \
        "hashes, are held out for evaluation" in err
    held = {r["prompt_id"] for r in json.loads((out / "iter0" / "eval.json").read_text())["rows"]}
    trained = {json.loads(r)["prompt_id"]
               for r in (out / "iter0" / "generated" / "train-frac00000-rank000-of001.jsonl")
               .open()}
    assert len(held) == 4 and len(trained) == 8 and not held & trained
    assert json.loads((out / "base" / "eval.json").read_text())["split"] == "train (held out)"
    assert "held out of the train split by their id hashes" in (out / "report.md").read_text()
