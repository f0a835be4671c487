"""Faults of `generate`: shards made otherwise, one prompt in two layouts, prompts too long.

Nothing of the user's lost, nothing false saved, every mistake one sentence: each case failed
before these rules (issue: "Nothing lost, nothing false")."""

import json

from helpers import write_jsonl, write_parquet
from selfplay.cli import main


def _generate(model, data, out, *extra, tokens="4", batch="4"):
    return main(["generate", "--model", str(model), "--dataset", str(data), "--output_dir",
                 str(out), "--max_new_tokens", tokens, "--batch_size", batch, *extra])


def test_a_shard_made_otherwise_is_never_reused_silently(tiny_model_dir, tmp_path, capsys):
    from helpers import write_jsonl
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
