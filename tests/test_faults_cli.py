"""Faults every command meets: options, output paths, warnings, bad data, models, datasets.

Nothing of the user's lost, nothing false saved, every mistake one sentence: each case failed
before these rules (issue: "Nothing lost, nothing false")."""

import json
import os
import subprocess
import sys
import time

import pytest

from selfplay.cli import main


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
