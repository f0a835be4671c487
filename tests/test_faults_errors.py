"""Every failure one sentence: broken models, a user's judge, full disks, cut records."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selfplay.cli import main

T = ["--max_new_tokens", "4", "--max_prompts", "4", "--max_length", "64",
     "--max_prompt_length", "32"]


def _one_sentence(err: str) -> str:
    assert "Traceback" not in err, err[-2000:]
    return err


def test_a_model_without_its_tokenizer_is_named(tiny_model_dir, tmp_path, capsys):
    d = tmp_path / "notok"
    shutil.copytree(tiny_model_dir, d)
    for f in d.glob("tokenizer*"):
        f.unlink()
    assert main(["generate", "--model", str(d), "--output_dir", str(tmp_path / "g"), *T]) == 2
    assert f"model {d} holds no tokenizer" in _one_sentence(capsys.readouterr().err)


@pytest.mark.parametrize("how", ["cut", "text"])
def test_a_broken_gguf_file_is_named(how, tmp_path, capsys):
    from selfplay.models import embedded_gguf_path
    g = tmp_path / "m.gguf"
    if how == "cut":
        g.write_bytes(embedded_gguf_path().read_bytes()[:100_000])
    else:
        g.write_text("not a model\n")
    assert main(["generate", "--model", str(g), "--output_dir", str(tmp_path / "g"), *T]) == 2
    err = _one_sentence(capsys.readouterr().err)
    assert (f"model {g} cannot be read as GGUF" if how == "cut" else
            f"model {g} is not a GGUF file") in err


def test_lora_targets_that_match_nothing_are_named(tiny_model_dir, tmp_path, capsys):
    assert main(["sft", "--model", str(tiny_model_dir), "--use_peft", "true",
                 "--lora_target_modules", "nonexistent_proj", "--max_steps", "1",
                 "--max_prompts", "4", "--output_dir", str(tmp_path / "s")]) == 2
    err = _one_sentence(capsys.readouterr().err)
    assert "--lora_target_modules nonexistent_proj:" in err and "q_proj" in err


def test_wandb_without_a_key_fails_before_any_work(tiny_model_dir, tmp_path, capsys,
                                                   monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    out = tmp_path / "w"
    assert main(["sft", "--model", str(tiny_model_dir), "--max_steps", "1", "--max_prompts",
                 "4", "--report_to", "wandb", "--output_dir", str(out)]) == 2
    assert "--report_to wandb: no W&B API key here" in _one_sentence(capsys.readouterr().err)
    assert not (out / "train_log.jsonl").exists()


@pytest.fixture
def samples(tiny_model_dir, tmp_path) -> Path:
    out = tmp_path / "samples"
    assert main(["generate", "--model", str(tiny_model_dir), "--output_dir", str(out),
                 "--num_samples", "2", "--temperature", "1.0", *T]) == 0
    return out


JUDGES = {
    "raises": ("def judge(p, r, e):\n    return {}['x']\n",
               "--judge judgemod:judge raised KeyError judging a prompt's 2 responses", 1),
    "none": ("def judge(p, r, e):\n    return None\n",
             "--judge judgemod:judge returned None for a prompt's 2 responses", 2),
    "syntax": ("def judge(:\n", "importing module 'judgemod' failed with SyntaxError", 1),
    "imports": ("import no_such_package_here\n",
                "it imports 'no_such_package_here', which is not installed", 1),
    "no_function": ("def other(p, r, e):\n    return [[0.5, 0.5], [0.5, 0.5]]\n",
                    "has no function 'judge'", 2),
}


@pytest.mark.parametrize("case", list(JUDGES))
def test_a_users_judge_that_fails_is_shown_with_its_traceback(case, samples, tmp_path,
                                                             monkeypatch, capsys):
    """The judge module sits in the current directory, as a user keeps it (before: not
    found, and every failure said "no function 'judge' in module 'judgemod'")."""
    code, said, rc = JUDGES[case]
    cwd = tmp_path / "work"
    cwd.mkdir()
    (cwd / "judgemod.py").write_text(code)
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(cwd))])
    sys.modules.pop("judgemod", None)
    assert main(["rank", "--input_dir", str(samples), "--judge", "judgemod:judge",
                 "--output_dir", str(tmp_path / "r")]) == rc
    err = capsys.readouterr().err
    assert said in err
    if rc == 1:              # the user's own traceback, then our sentence
        assert "Traceback" in err and 'judgemod.py"' in err
        assert err.rstrip().splitlines()[-1].startswith("error: --judge")
    sys.modules.pop("judgemod", None)


def test_a_judge_module_that_does_not_exist_is_named(samples, tmp_path, capsys):
    assert main(["rank", "--input_dir", str(samples), "--judge", "nosuchmod:fn",
                 "--output_dir", str(tmp_path / "r")]) == 2
    assert "there is no module 'nosuchmod' to import" in _one_sentence(capsys.readouterr().err)


def _limited(args: list[str], kib: int) -> subprocess.CompletedProcess:
    """`selfplay ARGS` with files limited to `kib` KiB (`ulimit -f`): a full disk's error."""
    return subprocess.run(["bash", "-c", f'ulimit -f {kib}; exec "$@"', "_", sys.executable,
                           "-m", "selfplay", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("command", ["generate", "convert", "train"])
def test_a_full_disk_is_one_sentence_and_leaves_no_half_file(command, tiny_model_dir, samples,
                                                             tmp_path):
    out = tmp_path / "out"
    args, kib = {
        "generate": (["generate", "--model", str(tiny_model_dir), *T], 1),
        "convert": (["convert", "--input_dir", str(samples)], 1),
        "train": (["train", "--model", str(tiny_model_dir), "--dataset", str(tmp_path / "pairs"),
                   "--max_steps", "1", "--per_device_train_batch_size", "2", "--report_to",
                   "none"], 300),
    }[command]
    if command == "train":
        assert main(["convert", "--input_dir", str(samples), "--output_dir",
                     str(tmp_path / "pairs")]) == 0
    res = _limited(args + ["--output_dir", str(out)], kib)
    assert res.returncode == 1, res.stderr[-2000:]
    assert "File too large" in _one_sentence(res.stderr)
    assert not list(out.rglob("*.tmp")) and not (out / ".selfplay-lock").exists()
    assert not (out / "training_complete.json").exists()


def test_overwrite_into_a_linked_directory_keeps_the_link(tiny_model_dir, samples, tmp_path):
    """--overwrite clears a linked output directory's contents, not the link (before:
    rmtree on a symlink, a traceback)."""
    assert main(["convert", "--input_dir", str(samples), "--output_dir",
                 str(tmp_path / "pairs")]) == 0
    real, link = tmp_path / "real", tmp_path / "link"
    real.mkdir()
    link.symlink_to(real)
    args = ["train", "--model", str(tiny_model_dir), "--dataset", str(tmp_path / "pairs"),
            "--per_device_train_batch_size", "2", "--report_to", "none", "--output_dir",
            str(link)]
    assert main(args + ["--max_steps", "1"]) == 0
    assert main(args + ["--max_steps", "2", "--overwrite"]) == 0
    assert link.is_symlink() and json.loads((real / "training_complete.json").read_text())[
        "steps"] == 2


def test_ctrl_c_while_importing_is_one_line(tmp_path):
    """SIGINT while the command still imports torch and transformers: one line, exit 130
    (before: a traceback through the imports)."""
    proc = subprocess.Popen([sys.executable, "-m", "selfplay", "generate", "--output_dir",
                             str(tmp_path / "g")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(0.4)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "interrupted" in err


@pytest.mark.parametrize("record", ["manifest.json", "base/eval.json"])
def test_a_cut_record_is_one_sentence_in_report_and_run(record, tiny_model_dir, tmp_path,
                                                        capsys):
    out = tmp_path / "run"
    args = ["run", "--model", str(tiny_model_dir), "--output_dir", str(out), "--num_iterations",
            "1", "--max_steps", "1", "--tasks_test_size", "4", "--tasks_train_size", "8",
            "--tasks_validation_size", "4", "--per_device_train_batch_size", "2",
            "--report_to", "none", *T]
    assert main(args) == 0
    f = out / record
    f.write_text(f.read_text()[:40])
    capsys.readouterr()
    assert main(["report", str(out)]) == 2
    err = _one_sentence(capsys.readouterr().err)
    assert f"{f} is" in err and "cut off or corrupt" in err
    if record == "manifest.json":
        assert main(args) == 2
        assert "cut off or corrupt" in _one_sentence(capsys.readouterr().err)


def test_skipping_past_the_end_names_skip_prompts(tmp_path, capsys):
    assert main(["generate", "--skip_prompts", "5000", "--max_prompts", "4",
                 "--tasks_train_size", "50", "--output_dir", str(tmp_path / "g")]) == 2
    assert "has 50 usable rows, and --skip_prompts 5000 skips them all" in \
        _one_sentence(capsys.readouterr().err)
