"""`selfplay run` on the tiny model: iterations, manifest, kill-and-resume, report."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selfplay.cli import main


def run_args(model_dir, out, *extra):
    return ["run", "--model", str(model_dir), "--output_dir", str(out), "--max_prompts", "8",
            "--tasks_test_size", "10", "--max_new_tokens", "6", "--per_device_train_batch_size",
            "4", "--learning_rate", "1e-3", "--logging_steps", "1", *extra]


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    """An uninterrupted 2-iteration run: the reference the resumed runs must reproduce."""
    out = tmp_path_factory.mktemp("run") / "full"
    assert main(run_args(tiny_model_dir, out)) == 0
    return out


def _final(out: Path):
    return (load_file(out / "iter1" / "model" / "model.safetensors"),
            json.loads((out / "iter1" / "eval.json").read_text()))


def test_two_iterations_manifest_and_report(finished_run):
    out = finished_run
    m = json.loads((out / "manifest.json").read_text())
    assert list(m["stages"]) == ["base/evaluate"] + [f"iter{t}/{s}" for t in (0, 1) for s in
                                                      ("generate", "convert", "train",
                                                       "evaluate")]
    assert all(s["state"] == "done" and s["checksums"] for s in m["stages"].values())
    assert m["recipe"]["num_iterations"] == 2 and m["seeds"]["seed"] == 42
    assert m["versions"]["torch"].startswith("2.")
    # iteration 1 trains on iteration 0's and its own pairs (the paper's data policy)
    done = json.loads((out / "iter1" / "model" / "training_complete.json").read_text())
    assert [s["pairs"] for s in done["sources"]] == [8, 8]
    assert done["stored_reference"] == 8        # its own pairs were scored by θ_1 when generated
    ev = json.loads((out / "iter1" / "eval.json").read_text())
    assert ev["win_rate"] is not None and ev["n"] == 10
    # every evaluation reads the whole held-out split (10), not max_prompts (8) of it
    assert json.loads((out / "base" / "eval.json").read_text())["n"] == 10
    report = (out / "report.md").read_text()
    assert "| iteration 1 |" in report and "win rate vs previous" in report
    assert (out / "plots" / "iterations.png").stat().st_size > 1000
    assert (out / "plots" / "training.png").stat().st_size > 1000


# generate killed anywhere: tests/test_generate.py (and iter0/generate here, slow)
@pytest.mark.parametrize("stage", [pytest.param("iter0/generate", marks=pytest.mark.slow),
                                   "iter1/convert", "iter1/train"])
def test_kill_and_resume_gives_the_same_result(tiny_model_dir, finished_run, tmp_path, stage):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "selfplay", *run_args(tiny_model_dir, out)]
    killed = subprocess.run(cmd, env={**os.environ, "SELFPLAY_KILL_AFTER": stage},
                            capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["stages"][stage]["state"] == "running"        # its work was done, not recorded
    resumed = subprocess.run(cmd, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"[{stage}] redo" in resumed.stderr
    assert "[base/evaluate] done; skipped" in resumed.stderr
    want_w, want_e = _final(finished_run)
    got_w, got_e = _final(out)
    for k in want_w:
        torch.testing.assert_close(got_w[k], want_w[k], atol=1e-6, rtol=0)
    assert got_e["rows"] == want_e["rows"]
    shards = list((out / "iter0" / "generated").glob("*.jsonl"))
    assert len(shards) == 1 and len(shards[0].read_text().splitlines()) == 8   # no duplicates


def test_finished_run_is_skipped_whole(tiny_model_dir, finished_run, capsys):
    assert main(run_args(tiny_model_dir, finished_run)) == 0
    err = capsys.readouterr().err
    assert err.count("done; skipped") == 9


def test_changed_recipe_is_refused_unless_forced(tiny_model_dir, finished_run, capsys):
    assert main(run_args(tiny_model_dir, finished_run, "--beta", "0.5")) == 2
    err = capsys.readouterr().err
    assert "beta differ" in err and "beta 0.1 -> 0.5" in err and "--force" in err


def test_forced_change_redoes_what_it_feeds_and_records_it(tiny_model_dir, finished_run,
                                                          tmp_path, capsys):
    out = tmp_path / "forced"
    shutil.copytree(finished_run, out)
    before = json.loads((out / "manifest.json").read_text())
    # an evaluation option feeds the evaluations only
    assert main(run_args(tiny_model_dir, out, "--reference_likelihood", "false",
                         "--force")) == 0
    err = capsys.readouterr().err
    assert "[force] reference_likelihood changed: redoing base/evaluate, iter0/evaluate, " \
           "iter1/evaluate" in err
    assert err.count("done; skipped") == 6 and err.count("redo (forced recipe change)") == 3, \
        [x for x in err.splitlines() if x.startswith("[")]
    m = json.loads((out / "manifest.json").read_text())
    assert m["recipe"]["reference_likelihood"] is False and m["redo"] == []
    assert m["forced"][-1]["changed"] == {"reference_likelihood": [True, False]}
    assert m["stages"]["iter1/train"] == before["stages"]["iter1/train"]
    assert m["stages"]["iter1/evaluate"]["forced"] is True
    # a loss option redoes the training it feeds, and what reads the new model follows
    assert main(run_args(tiny_model_dir, out, "--reference_likelihood", "false", "--beta",
                         "0.5", "--force")) == 0
    err = capsys.readouterr().err
    assert "[force] beta changed: redoing iter0/train, iter1/train" in err
    assert "[iter0/generate] done; skipped" in err and "[iter1/generate] start" in err
    m = json.loads((out / "manifest.json").read_text())
    assert m["recipe"]["beta"] == 0.5 and m["redo"] == [] and len(m["forced"]) == 2
    assert m["stages"]["iter0/train"]["checksums"] != before["stages"]["iter0/train"]["checksums"]
    # the same recipe again: nothing to redo, also from a manifest of before relative keys
    m = json.loads((out / "manifest.json").read_text())
    m["recipe"]["output_dir"] = "somewhere/run"
    for rec in m["stages"].values():
        rec["checksums"] = {f"somewhere/run/{k}": v for k, v in rec["checksums"].items()}
    (out / "manifest.json").write_text(json.dumps(m))
    assert main(run_args(tiny_model_dir, out, "--reference_likelihood", "false", "--beta",
                         "0.5")) == 0
    assert capsys.readouterr().err.count("done; skipped") == 9


def test_affected_stages_follow_the_keys():
    from selfplay.config import affected_stages
    order = ["base/evaluate", "sft/train", "sft/evaluate"] + [
        f"iter{t}/{s}" for t in (0, 1) for s in ("generate", "convert", "train", "evaluate")]
    base = {"learning_rate": 1e-6, "iterations": [], "sft_epochs": 1.0, "temperature": 0.0,
            "num_iterations": 2, "max_new_tokens": 64, "drop_identical": True}

    def hit(**change):
        return affected_stages(base, {**base, **change}, order)
    assert hit(iterations=[{}, {"learning_rate": 1e-7}]) == ["iter1/train"]
    assert hit(learning_rate=2e-6) == ["iter0/train", "iter1/train"]   # SFT has its own
    assert hit(warmup_ratio=0.2) == ["sft/train", "iter0/train", "iter1/train"]
    assert hit(sft_epochs=2.0) == ["sft/train"]
    assert hit(temperature=0.7) == ["iter0/generate", "iter1/generate"]
    assert hit(max_new_tokens=32) == ["base/evaluate", "sft/evaluate", "iter0/generate",
                                      "iter0/evaluate", "iter1/generate", "iter1/evaluate"]
    assert hit(drop_identical=False) == ["iter0/convert", "iter1/convert"]
    assert hit(num_iterations=3) == []
    assert hit(num_train_epochs=1.0) == ["iter0/train", "iter1/train"]    # not the SFT stage's
    assert hit(method="sppo") == ["iter0/generate", "iter0/convert", "iter0/train",
                                  "iter1/generate", "iter1/convert", "iter1/train"]
    assert hit(max_prompts=512, tasks_train_size=2600) == [
        "sft/train", "iter0/generate", "iter1/generate"]


def test_bad_recipe_value_fails_before_any_work(tiny_model_dir, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("num_iterations: 2\niterations:\n  - {}\n  - {learning_rate: -1}\n")
    out = tmp_path / "never"
    assert main(["run", str(recipe), "--output_dir", str(out)]) == 2
    assert "iteration 1 of `iterations`: --learning_rate must be positive" in \
        capsys.readouterr().err
    assert not out.exists()


def test_from_iteration_starts_there(tiny_model_dir, finished_run, tmp_path):
    out = tmp_path / "late"
    assert main(run_args(finished_run / "iter0" / "model", out, "--from_iteration", "1")) == 0
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    assert list(stages) == ["base/evaluate"] + [f"iter1/{s}" for s in ("generate", "convert",
                                                                       "train", "evaluate")]
    assert not (out / "iter0").exists()


def test_push_only_when_asked(tiny_model_dir, finished_run, monkeypatch):
    import selfplay.stages.run as loop
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            calls.append(("create", repo_id))

        def upload_folder(self, folder_path, repo_id, **kw):
            calls.append(("upload", repo_id, Path(folder_path).name))

    monkeypatch.setattr(loop, "HfApi", FakeApi)
    assert main(run_args(tiny_model_dir, finished_run)) == 0
    assert calls == []
    assert main(run_args(tiny_model_dir, finished_run, "--push_to_hub", "me/smol-spin")) == 0
    assert calls == [("create", "me/smol-spin"), ("upload", "me/smol-spin", "model")]


def test_report_command(finished_run, capsys):
    assert main(["report", str(finished_run)]) == 0
    assert "| iteration 0 |" in capsys.readouterr().out
    assert main(["report", str(finished_run / "iter0")]) == 2


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# one machine with sharded training, two "machines" with data parallelism: the DDP loop on
# one machine is what either would show apart
@pytest.mark.parametrize("machines,fsdp", [(2, False), (1, True)])
def test_two_processes_run_the_loop_as_one(machines, fsdp, tiny_model_dir, tmp_path):
    """`accelerate launch -m selfplay run` on 2 CPU processes, on one machine or as two
    "machines" (two launchers, --num_machines 2, machine ranks 0 and 1, as users start a
    multi-node job; here on one host): each process generates its slice of the prompts and
    trains data-parallel (or sharded, --fsdp), the main process converts, evaluates and
    writes the manifest, and every stage waits for both. The same pairs, answers and weights
    as one process with the same global batch."""
    import pyarrow.parquet as pq
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["--num_iterations", "1", "--optim", "adamw"]
    assert main(run_args(tiny_model_dir, one, *args)) == 0
    half = run_args(tiny_model_dir, two, *args, *(["--fsdp", "true"] if fsdp else []))
    half[half.index("--per_device_train_batch_size") + 1] = "2"   # 2 processes x 2 = 4
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
              "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if machines == 1:
        launchers = [launch + ["--num_machines", "1"]]
    else:
        port = str(_free_port())
        launchers = [launch + ["--num_machines", "2", "--machine_rank", str(r),
                               "--main_process_ip", "127.0.0.1", "--main_process_port", port]
                     for r in range(2)]
    procs = [subprocess.Popen(cmd + ["-m", "selfplay"] + half, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for cmd in launchers]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * machines, outs[0][-3000:]
    assert sorted(p.name for p in (two / "iter0" / "generated").glob("*.jsonl")) == [
        "train-frac00000-rank000-of002.jsonl", "train-frac00000-rank001-of002.jsonl"]
    pairs = "iter0/pairs/train_prefs-00000-of-00001.parquet"
    assert pq.read_table(one / pairs).to_pylist() == pq.read_table(two / pairs).to_pylist()
    for ev in ("base/eval.json", "iter0/eval.json"):
        assert json.loads((one / ev).read_text())["rows"] == \
            json.loads((two / ev).read_text())["rows"]
    m = json.loads((two / "manifest.json").read_text())
    assert all(s["state"] == "done" for s in m["stages"].values()) and len(m["stages"]) == 5
    a = load_file(one / "iter0" / "model" / "model.safetensors")
    b = load_file(two / "iter0" / "model" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    assert (two / "report.md").exists()
    done = json.loads((two / "iter0" / "model" / "training_complete.json").read_text())
    assert ("sharding" in done) == fsdp


def test_a_manifest_from_before_the_newer_options_resumes(tiny_model_dir, finished_run,
                                                          capsys):
    """A run directory of selfplay before --fsdp, --fsdp_bf16_params and --holdout_size
    existed (its recipe lacks them): those options at their defaults are no change."""
    path = finished_run / "manifest.json"
    saved = path.read_text()
    m = json.loads(saved)
    for key in ("fsdp", "fsdp_bf16_params", "holdout_size"):
        del m["recipe"][key]
    m.pop("inputs")
    path.write_text(json.dumps(m))
    try:
        assert main(run_args(tiny_model_dir, finished_run)) == 0
        assert capsys.readouterr().err.count("done; skipped") == 9
    finally:
        path.write_text(saved)
