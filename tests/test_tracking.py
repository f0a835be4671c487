"""--report_to: TensorBoard, W&B (in its offline mode: no network), both or none."""

import json
import struct
from pathlib import Path

import pytest

from selfplay.cli import main
from test_loop import run_args


def wandb_records(run_file: Path):
    """The records of a W&B run file (.wandb): a LevelDB-style log of protobuf records, which
    the wandb package writes but no longer reads back in Python."""
    from wandb.proto import wandb_internal_pb2 as pb
    raw, pos, part, block = run_file.read_bytes(), 7, b"", 32768   # 7: the ":W&B" header
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:                       # a block's tail too short for a header is padding
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        data, pos = raw[pos + 7:pos + 7 + n], pos + 7 + n
        part = data if kind in (1, 2) else part + data       # full, first / middle, last
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(part)
            yield rec


def wandb_runs(root: Path) -> dict[str, dict]:
    """Each offline run under root by name: its config, metric history and saved files."""
    runs = {}
    for f in root.glob("wandb/offline-run-*/run-*.wandb"):
        run = {"history": [], "files": set(), "config": {}}
        for rec in wandb_records(f):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                name, group = rec.run.display_name, rec.run.run_group
                run["config"] = {i.key: json.loads(i.value_json) for i in rec.run.config.update}
                run["group"] = group
            elif kind == "history":
                run["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                       for i in rec.history.item})
            elif kind == "files":
                run["files"] |= {x.path for x in rec.files.files}
        runs[name] = run
    return runs


def test_report_to_is_checked(capsys):
    assert main(["train", "--report_to", "tensorboard,mlflow"]) == 2
    assert "--report_to 'tensorboard,mlflow': give tensorboard, wandb, both" in \
        capsys.readouterr().err


def test_a_run_reports_to_wandb_offline(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_RUN_GROUP", raising=False)
    out = tmp_path / "myrun"
    assert main(run_args(tiny_model_dir, out, "--num_iterations", "1",
                         "--report_to", "tensorboard,wandb")) == 0
    runs = wandb_runs(tmp_path)
    train, report = runs[str(out / "iter0" / "model")], runs["myrun report"]
    assert train["group"] == report["group"] == "myrun"
    # the training's metrics, as in train_log.jsonl, and its recipe
    log = [json.loads(x) for x in (out / "iter0" / "model" / "train_log.jsonl").read_text()
           .splitlines()]
    got = [h for h in train["history"] if "loss" in h]
    assert [h["_step"] for h in got] == [r["step"] for r in log]
    assert [h["loss"] for h in got] == pytest.approx([r["loss"] for r in log])
    assert train["config"]["beta"] == 0.1 and train["config"]["learning_rate"] == 1e-3
    # the run: each model's accuracy with its interval, and the report with its plots
    acc = [h for h in report["history"] if "eval" in h or "eval/accuracy" in h]
    evals = [json.loads((out / d / "eval.json").read_text()) for d in ("base", "iter0")]
    flat = [h.get("eval/accuracy", (h.get("eval") or {}).get("accuracy")) for h in acc]
    assert flat == [e["accuracy"] for e in evals]
    assert {"report.md", "plots/iterations.png"} <= report["files"]
    assert report["config"]["num_iterations"] == 1
    # TensorBoard as before
    assert list((out / "iter0" / "model" / "tensorboard").glob("events.out.tfevents.*"))
