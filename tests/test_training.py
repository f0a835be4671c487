"""`selfplay train` on the tiny model: reference log-probs, resume, LoRA, QLoRA, two processes."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import kill_after_first_checkpoint, write_parquet
from selfplay.cli import main



# ---------------------------------------------------------------------------------------
# `selfplay train` end to end on the tiny model
# ---------------------------------------------------------------------------------------

def _pairs(n=16):
    rows = []
    for i in range(n):
        u = {"role": "user", "content": f"What is {i} plus {i}?"}
        rows.append({"prompt_id": f"p{i}",
                     "real": [u, {"role": "assistant", "content": f"{i} + {i} = {2 * i}.\n"
                                                                  f"Answer: {2 * i}"}],
                     "generated": [u, {"role": "assistant", "content": f"Maybe {i}? " * 3}]})
    return rows


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    write_parquet(d / "train_prefs-00000-of-00001.parquet", _pairs())
    return d


def _train(model_dir, data, out, *extra):
    return main(["train", "--model", str(model_dir), "--dataset", str(data), "--output_dir",
                 str(out), "--per_device_train_batch_size", "4", "--logging_steps", "1",
                 "--learning_rate", "1e-3", *extra])


def _log(out):
    return [json.loads(ln) for ln in (Path(out) / "train_log.jsonl").read_text().splitlines()]


def test_training_raises_margins_and_saves_a_loadable_checkpoint(tiny_model_dir, pairs_dir,
                                                                  tmp_path):
    out = tmp_path / "ckpt"
    assert _train(tiny_model_dir, pairs_dir, out, "--num_train_epochs", "3") == 0
    log = _log(out)
    assert len(log) == 12 and log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert log[-1]["rewards/margins"] > log[0]["rewards/margins"] + 1.0
    assert log[-1]["rewards/accuracies"] == 1.0
    assert {"rewards/real", "rewards/generated", "logps/real", "logps/generated", "grad_norm",
            "learning_rate", "loss"} <= set(log[0])
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    # a plain Hugging Face checkpoint: transformers loads it as is, and it generates
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and model.config.use_cache
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    gen = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] > ids["input_ids"].shape[1]
    # finished: a re-run skips it
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert _train(tiny_model_dir, pairs_dir, out, "--num_train_epochs", "3") == 0
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("precision", [[], ["--bf16", "true"]], ids=["float32", "bf16"])
def test_stored_reference_equals_computed(tiny_model_dir, tmp_path, precision):
    """Pairs scored at generation time and pairs without scores train identically; under
    --bf16, scoring runs in the autocast training runs in."""
    from selfplay.data.shards import shard_name
    from selfplay.io import write_jsonl_atomic
    gen = tmp_path / "gen"
    gen.mkdir()
    rows = [{"prompt_id": r["prompt_id"], "prompt": r["real"][:1],
             "reference": r["real"][1]["content"], "responses": [r["generated"][1]["content"]],
             "response_tokens": [1], "finish_reasons": ["eos"], "extra": {}} for r in _pairs(8)]
    write_jsonl_atomic(gen / shard_name("train", 0, 0, 1), rows)
    assert main(["score", "--model", str(tiny_model_dir), "--dataset", str(gen),
                 "--output_dir", str(tmp_path / "scored"), *precision]) == 0
    assert main(["convert", "--input_dir", str(tmp_path / "scored"), "--output_dir",
                 str(tmp_path / "pairs_scored")]) == 0
    assert main(["convert", "--input_dir", str(gen), "--output_dir",
                 str(tmp_path / "pairs_plain")]) == 0
    for name in ("scored", "plain"):
        assert _train(tiny_model_dir, tmp_path / f"pairs_{name}", tmp_path / f"out_{name}",
                      "--max_steps", "3", *precision) == 0
    a = json.loads((tmp_path / "out_scored" / "training_complete.json").read_text())
    b = json.loads((tmp_path / "out_plain" / "training_complete.json").read_text())
    assert a["stored_reference"] == 8 and b["stored_reference"] == 0
    for x, y in zip(_log(tmp_path / "out_scored"), _log(tmp_path / "out_plain")):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)


def test_stored_reference_is_used_by_weights_not_by_name(tiny_model_dir, tmp_path, tokenizer):
    """Stored log-probs are valid for the weights that computed them, whatever the path is
    called: a copy of the scorer under another name uses them; the scorer's own path,
    overwritten with other weights, does not (it would train against a stale reference)."""
    import shutil

    from helpers import make_tiny_model
    from selfplay.data.shards import shard_name
    from selfplay.io import write_jsonl_atomic
    scorer = tmp_path / "scorer"
    shutil.copytree(tiny_model_dir, scorer)
    gen = tmp_path / "gen"
    rows = [{"prompt_id": r["prompt_id"], "prompt": r["real"][:1],
             "reference": r["real"][1]["content"], "responses": [r["generated"][1]["content"]],
             "response_tokens": [1], "finish_reasons": ["eos"], "extra": {}} for r in _pairs(4)]
    gen.mkdir()
    write_jsonl_atomic(gen / shard_name("train", 0, 0, 1), rows)
    assert main(["score", "--model", str(scorer), "--dataset", str(gen),
                 "--output_dir", str(tmp_path / "scored")]) == 0
    assert main(["convert", "--input_dir", str(tmp_path / "scored"), "--output_dir",
                 str(tmp_path / "pairs")]) == 0

    def stored(model, out, *extra):
        assert _train(model, tmp_path / "pairs", tmp_path / out, "--max_steps", "1",
                      *extra) == 0
        return json.loads((tmp_path / out / "training_complete.json").read_text())[
            "stored_reference"]

    assert stored(tiny_model_dir, "same_weights_other_name") == 4
    # float32 log-probs are not a bf16 training's reference: it computes its own
    assert stored(tiny_model_dir, "same_weights_bf16", "--bf16", "true") == 0
    make_tiny_model(tokenizer, seed=7).save_pretrained(scorer)     # same name, other weights
    assert stored(scorer, "same_name_other_weights") == 0


def test_one_forward_pass_per_step(tiny_model_dir, pairs_dir, tmp_path, monkeypatch):
    import selfplay.logprobs as tr
    calls = []
    orig = tr.ResponseLogProbs.forward

    def counting(self, input_ids, attention_mask, response_mask):
        if self.training:                 # not the reference pass, which runs in eval mode
            calls.append(input_ids.shape[0])
        return orig(self, input_ids, attention_mask, response_mask)

    monkeypatch.setattr(tr.ResponseLogProbs, "forward", counting)
    assert _train(tiny_model_dir, pairs_dir, tmp_path / "o", "--max_steps", "2") == 0
    assert calls == [8, 8]                # 4 pairs: [4 real; 4 generated] in one batch


def test_resume_reaches_the_same_weights(tiny_model_dir, pairs_dir, tmp_path):
    """Kill a run after its first checkpoint, resume it: the same final weights."""
    args = ["--model", str(tiny_model_dir), "--dataset", str(pairs_dir),
            "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--logging_steps",
            "1", "--max_steps", "40", "--save_steps", "2", "--optim", "adamw"]
    full = tmp_path / "full"
    assert main(["train", "--output_dir", str(full), *args]) == 0
    cut = tmp_path / "cut"
    kill_after_first_checkpoint(["train", "--output_dir", str(cut), *args], cut)
    assert main(["train", "--output_dir", str(cut), "--resume", *args]) == 0
    a, b = load_file(full / "model.safetensors"), load_file(cut / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    assert [r["step"] for r in _log(cut)] == list(range(1, 41))    # no duplicated log lines


def test_lora_reference_is_the_disabled_adapter_and_merges(tiny_model_dir, pairs_dir, tmp_path):
    out = tmp_path / "lora"
    assert _train(tiny_model_dir, pairs_dir, out, "--use_peft", "--lora_r", "4",
                  "--max_steps", "4") == 0
    log = _log(out)
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)   # adapter off = θ_t
    assert log[-1]["rewards/margins"] > 0
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(out)            # merged: a plain model
    assert not any("lora" in n for n, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert any(not torch.equal(p, q) for p, q in zip(merged.parameters(), base.parameters()))
    ad = tmp_path / "adapter"
    assert _train(tiny_model_dir, pairs_dir, ad, "--use_peft", "--max_steps", "2",
                  "--merge_adapter", "false") == 0
    assert (ad / "adapter_config.json").exists() and not (ad / "model.safetensors").exists()


def test_qlora_loads_4bit_and_trains(tiny_model_dir, pairs_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "qlora"
    assert _train(tiny_model_dir, pairs_dir, out, "--use_peft", "--load_in_4bit",
                  "--max_steps", "3") == 0
    log = _log(out)
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert log[-1]["loss"] < log[0]["loss"]
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(out)                 # merged in full precision
    assert m.dtype == torch.float32


def _one_and_two_processes(tmp_path, *options):
    """`selfplay train` in one process at batch 4, then on 2 CPU processes at 2 each (the same
    global batch): their logs."""
    common = ["--learning_rate", "1e-3", "--logging_steps", "1", "--max_steps", "3",
              "--optim", "adamw", *options]
    assert main(["train", "--output_dir", str(tmp_path / "one"),
                 "--per_device_train_batch_size", "4", *common]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                          "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
                          "no", "--dynamo_backend", "no", "-m", "selfplay", "train",
                          "--output_dir", str(tmp_path / "two"),
                          "--per_device_train_batch_size", "2", *common],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return _log(tmp_path / "one"), _log(tmp_path / "two")


def test_ddp_on_two_cpu_processes_equals_one_process(tiny_model_dir, pairs_dir, tmp_path):
    one, two = _one_and_two_processes(tmp_path, "--model", str(tiny_model_dir), "--dataset",
                                      str(pairs_dir))
    for x, y in zip(one, two):          # metrics are averaged across processes
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
    a = load_file(tmp_path / "one" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_sft_data_without_responses_is_refused(tiny_model_dir, tmp_path, capsys):
    assert main(["train", "--model", str(tiny_model_dir), "--dataset", "builtin:tasks",
                 "--output_dir", str(tmp_path / "x")]) == 2
    assert "no generated (or rejected) responses" in capsys.readouterr().err


def test_mixture_takes_the_first_share_of_each(tiny_model_dir, pairs_dir, tmp_path):
    out = tmp_path / "mix"
    assert _train(tiny_model_dir, f"{pairs_dir}:0.5,{pairs_dir}:0.25", out,
                  "--max_steps", "1") == 0
    done = json.loads((out / "training_complete.json").read_text())
    assert [s["pairs"] for s in done["sources"]] == [8, 4]


def test_epoch_batches_are_seeded_grouped_and_split_evenly():
    import random
    from selfplay.trainer import epoch_batches
    rnd = random.Random(0)
    lengths = [rnd.randint(20, 300) for _ in range(103)]
    a = epoch_batches(lengths, 4, 1, seed=1, epoch=0)
    assert a == epoch_batches(lengths, 4, 1, seed=1, epoch=0)
    assert a != epoch_batches(lengths, 4, 1, seed=1, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(103))          # each pair once
    padded = lambda bs: sum(len(b) * max(lengths[i] for i in b) for b in bs)
    random_order = epoch_batches(lengths, 4, 1, 1, 0, group_by_length=False)
    assert padded(a) < 0.8 * padded(random_order)
    # two processes see the same global batches as one process with twice the batch
    two = epoch_batches(lengths, 2, 2, seed=1, epoch=0)
    assert len(two) == len(a)
    assert all(t[:len(x)] == x for t, x in zip(two, a))   # the same batches, in the same order
    assert all(len(b) % 2 == 0 for b in two)               # the short last one padded to split


def test_lora_gradients_under_the_4bit_base_equal_those_on_its_dequantized_weights(
        tiny_model_dir, tokenizer):
    """QLoRA's backward through bitsandbytes' 4-bit layers (on CPU it warns that `gemv_4bit`
    has no autograd kernel): the LoRA gradients equal those of the same LoRA on a float model
    holding the de-quantized weights, so the 4-bit path computes the gradient it should."""
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM
    from selfplay.config import LoraSettings
    from selfplay.logprobs import response_logps
    from selfplay.models import load_for_training, wrap_lora
    from selfplay.rendering import collate, encode
    # no LoRA dropout: both models must draw the same computation
    lora = LoraSettings(use_peft=True, load_in_4bit=True, lora_dropout=0.0)
    torch.manual_seed(0)
    q, _ = load_for_training(str(tiny_model_dir), "auto", lora, torch.device("cpu"))
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    quantized = {n: m for n, m in q.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantized                                       # the base really is 4-bit
    for n, m in plain.named_modules():                     # the float copy: de-quantized weights
        qm = quantized.get(f"base_model.model.{n}.base_layer")
        if qm is not None:
            w = bnb.functional.dequantize_4bit(qm.weight.data, qm.weight.quant_state)
            m.weight.data.copy_(w.to(torch.float32))
    f = wrap_lora(plain, LoraSettings(use_peft=True, lora_dropout=0.0))
    adapter = {k: v for k, v in q.state_dict().items() if "lora_" in k}
    assert not f.load_state_dict(adapter, strict=False).unexpected_keys
    batch = collate([encode(tokenizer, [{"role": "user", "content": f"What is {i} plus {i}?"}],
                            f"It is {2 * i}.", 64, 32) for i in range(3)],
                    tokenizer.pad_token_id)
    grads = []
    for model in (q, f):
        model.zero_grad()
        logp, _ = response_logps(model, batch["input_ids"], batch["attention_mask"],
                                 batch["response_mask"])
        logp.sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) >= 4
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in grads[0].values())


def test_qlora_on_two_cpu_processes_equals_one_process(tiny_model_dir, pairs_dir, tmp_path):
    """The seeds' two-consumer-GPU case, on CPU: QLoRA under 2-process DDP."""
    pytest.importorskip("bitsandbytes")
    one, two = _one_and_two_processes(
        tmp_path, "--model", str(tiny_model_dir), "--dataset", str(pairs_dir), "--use_peft",
        "--load_in_4bit", "--merge_adapter", "false",
        "--lora_dropout", "0")                     # dropout draws differ with the process count
    assert one[0]["grad_norm"] == pytest.approx(two[0]["grad_norm"], rel=1e-5)
    assert [x["loss"] for x in one] == pytest.approx([y["loss"] for y in two], abs=1e-5)
    assert one[-1]["loss"] < one[0]["loss"]
    a = load_file(tmp_path / "one" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def accelerate_config(tmp_path: Path, name: str, **changes) -> Path:
    """The shipped recipes/accelerate/NAME with `changes`, written under tmp_path."""
    import yaml
    cfg = yaml.safe_load((Path(__file__).parents[1] / "recipes" / "accelerate" / name)
                         .read_text())
    cfg.update(changes)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_zero3_in_one_process_equals_plain_training(tiny_model_dir, pairs_dir, tmp_path):
    """The shipped ZeRO-3 config in one process, on DeepSpeed's CPU accelerator: the model
    built partitioned (zero3_init_flag), the reference pass through DeepSpeed's engine, the
    gathered save: plain training's losses and weights (tests/test_gpu.py: on a GPU)."""
    pytest.importorskip("deepspeed")
    config = accelerate_config(tmp_path, "zero3.yaml", num_processes=1, mixed_precision="no")
    common = ["--optim", "adamw", "--max_steps", "6"]
    assert _train(tiny_model_dir, pairs_dir, tmp_path / "plain", *common) == 0
    res = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                          str(config), "-m", "selfplay", "train", "--model",
                          str(tiny_model_dir), "--dataset", str(pairs_dir), "--output_dir",
                          str(tmp_path / "z3"), "--per_device_train_batch_size", "4",
                          "--logging_steps", "1", "--learning_rate", "1e-3", *common],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert res.returncode == 0, res.stderr[-3000:]
    for x, y in zip(_log(tmp_path / "plain"), _log(tmp_path / "z3"), strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
    a = load_file(tmp_path / "plain" / "model.safetensors")
    b = load_file(tmp_path / "z3" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)


def test_a_zero3_config_that_would_not_shard_is_refused(tiny_model_dir, pairs_dir, tmp_path):
    """accelerate shards with DeepSpeed only on accelerators: on CPU a ZeRO-3 config would
    run as plain data-parallel processes (use_cpu: true), each with the whole model. Refused,
    in one sentence, before any training, naming --fsdp, which shards on CPU too (an FSDP
    config runs our FSDP2: tests/test_sharding.py)."""
    pytest.importorskip("deepspeed")          # accelerate's launcher needs it installed
    path = accelerate_config(tmp_path, "zero3.yaml", num_processes=2, use_cpu=True,
                             mixed_precision="no")
    res = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                          str(path), "-m", "selfplay", "train", "--model",
                          str(tiny_model_dir), "--dataset", str(pairs_dir), "--output_dir",
                          str(tmp_path / "out"), "--max_steps", "1"],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode != 0
    assert ("the accelerate config asks for DEEPSPEED, but accelerate" in res.stderr and
            "runs MULTI_CPU here (it shards only on GPUs and other accelerators)"
            in res.stderr and "--fsdp true" in res.stderr)
    assert not (tmp_path / "out" / "model.safetensors").exists()
