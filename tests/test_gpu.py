"""On a CUDA GPU: training against the CPU, FSDP and ZeRO-3 under accelerate, a --bf16 loop.

Skipped elsewhere (as in CI, which has none); run on a lent GPU machine by bench/gpu_check.sh.
Training on the GPU against the CPU; the shipped FSDP and ZeRO-3 configs under `accelerate
launch` against plain training, and exact resume under FSDP; a tiny loop with --bf16. One GPU,
so one process: sharding over a world of one still goes through the whole wrapping, gathering
and saving code.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import write_parquet
from selfplay.cli import main
from test_training import _pairs, accelerate_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

COMMON = ["--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--logging_steps",
          "1", "--optim", "adamw", "--max_steps", "6"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    write_parquet(d / "train_prefs-00000-of-00001.parquet", _pairs())
    return d


def _log(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()]


def _same_weights(a: Path, b: Path, atol: float) -> None:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k].float(), y[k].float(), atol=atol, rtol=0, msg=k)


def _config(tmp_path: Path, name: str) -> Path:
    """A shipped accelerate config for this machine's one GPU, in float32 (mixed precision
    changes the numbers, not the code paths under test)."""
    return accelerate_config(tmp_path, name, num_processes=1, mixed_precision="no")


def _launch(config: Path, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "-m", "selfplay", *args]


def _run(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]


def _train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--dataset", str(data), "--output_dir", str(out),
            *COMMON, *extra]


@pytest.fixture(scope="module")
def on_gpu(tiny_model_dir, pairs, tmp_path_factory):
    """Plain `selfplay train` on the GPU, float32: what the sharded runs must reproduce."""
    out = tmp_path_factory.mktemp("gpu") / "plain"
    assert main(_train_args(tiny_model_dir, pairs, out)) == 0
    return out


def test_training_on_the_gpu_equals_the_cpu(tiny_model_dir, pairs, on_gpu, tmp_path):
    cpu = tmp_path / "cpu"     # its own process: this one's accelerate state holds the GPU
    _run([sys.executable, "-m", "selfplay",
          *_train_args(tiny_model_dir, pairs, cpu, "--device", "cpu")])
    for a, b in zip(_log(on_gpu), _log(cpu)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
    _same_weights(on_gpu, cpu, atol=1e-4)
    assert json.loads((on_gpu / "training_complete.json").read_text())


@pytest.mark.parametrize("name", ["fsdp.yaml", "zero3.yaml"])
def test_a_sharded_run_equals_plain_training(name, tiny_model_dir, pairs, on_gpu, tmp_path):
    """The shipped config (FSDP full shard with cpu-RAM-efficient loading; ZeRO-3) trains,
    saves one full checkpoint that loads as a plain model, and reaches plain training's
    weights."""
    if name == "zero3.yaml":
        pytest.importorskip("deepspeed")
    out = tmp_path / "sharded"
    _run(_launch(_config(tmp_path, name), _train_args(tiny_model_dir, pairs, out)))
    for a, b in zip(_log(on_gpu), _log(out)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
    _same_weights(on_gpu, out, atol=1e-5)
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(out)


def test_fsdp_resume_reaches_the_same_weights(tiny_model_dir, pairs, on_gpu, tmp_path):
    """Killed after its first checkpoint, an FSDP run resumes to the uninterrupted weights."""
    out = tmp_path / "cut"
    cmd = _launch(_config(tmp_path, "fsdp.yaml"),
                  _train_args(tiny_model_dir, pairs, out, "--save_steps", "2"))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)      # the launcher and its worker together
    deadline = time.time() + 300
    while not list((out / "checkpoints").glob("step-*/trainer_state.json")):
        assert proc.poll() is None and time.time() < deadline, "no checkpoint before the end"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "training_complete.json").exists()
    _run(cmd + ["--resume"])
    _same_weights(on_gpu, out, atol=1e-5)
    assert [r["step"] for r in _log(out)] == list(range(1, 7))


def test_the_loop_in_bf16_on_the_gpu(tiny_model_dir, tmp_path):
    """`selfplay run` end to end on the GPU with --bf16 (float32 weights, bf16 autocast):
    generation, training and evaluation on cuda, a complete manifest."""
    out = tmp_path / "run"
    assert main(["run", "--model", str(tiny_model_dir), "--output_dir", str(out),
                 "--max_prompts", "8", "--tasks_test_size", "10", "--max_new_tokens", "6",
                 "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
                 "--num_iterations", "1", "--bf16"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert all(s["state"] == "done" for s in m["stages"].values())
    log = _log(out / "iter0" / "model")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert json.loads((out / "iter0" / "eval.json").read_text())["n"] == 10


def test_sampling_on_the_gpu_is_seeded_per_row(tiny_model_dir):
    """Each sampled row draws from its own stream on the GPU: the same seeds give the same
    answers whatever else is in the batch (K copies in one pass equal K passes)."""
    from selfplay.engines.base import SamplingSettings
    from selfplay.engines.hf import HFEngine
    engine = HFEngine(str(tiny_model_dir), "cuda")
    prompts = [[{"role": "user", "content": f"What is {i} plus {i}?"}] for i in range(6)]
    s = SamplingSettings(max_new_tokens=12, temperature=1.0, top_p=0.9, batch_size=4)
    alone = [engine.generate([p], s, [100 + i]) for i, p in enumerate(prompts)]
    together = engine.generate(prompts, s, [100 + i for i in range(6)])
    assert [a[0].text for a in alone] == [g.text for g in together]
    assert len({g.text for g in together}) > 1
