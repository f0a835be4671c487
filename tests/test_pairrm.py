"""PairRM on plain transformers, token for token as llm-blender, up to `rank --judge pairrm`.

Inputs token for token as llm-blender builds them, the head, checkpoints in both layouts, the
estimators, the judge and `selfplay rank --judge pairrm`.

The tiny models use a DeBERTa-v3-shaped tokenizer trained here: a sentencepiece unigram model
with DeBERTa-v3's ids ([PAD] 0, [CLS] 1, [SEP] 2, [UNK] 3, [MASK] after the pieces) saved with
the tokenizer.json pipeline transformers 4 converted spm.model to (what PairRM-hf ships).
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from selfplay.errors import SelfplayError
from selfplay.judges import pairrm
from selfplay.judges import pairrm_inputs as inputs
from selfplay.judges import preferences as prefs
from selfplay.judges.pairrm import DebertaV2PairRM, PairRM, PairRMJudge
from selfplay.judges.pairrm_inputs import add_pairrm_tokens, candidate_budget, encode_prompt

WORDS = ("the a of to and in is it you that he was for on are with as his they be at one have "
         "this from or had by hot word but what some we can out other were all there when up use "
         "your how said an each she which do their time if will way about many then them write "
         "would like so these her long make thing see him two has look more day could go come "
         "did number sound no most people my over know water than call first who may down side "
         "been now find any new work part take get place made live where after back little only "
         "round man year came show every good me give our under name very through just form "
         "great think say help low line turn cause much mean before move right boy old too same "
         "tell does set three want air well also play small end put home read hand large add "
         "hello hi love hate thanks sure joke answer question apple banana")


def _sentences(n: int, seed: int = 0) -> list[str]:
    rng, words = random.Random(seed), WORDS.split()
    out = []
    for i in range(n):
        s = " ".join(rng.choice(words) for _ in range(rng.randint(4, 16)))
        out.append(s[0].upper() + s[1:] + rng.choice(".!?,:") + (f" {i * 7}" if i % 3 else ""))
    return out


@pytest.fixture(scope="session")
def deberta_tok_dir(tmp_path_factory):
    """A DeBERTa-v3-layout tokenizer directory (no PairRM markers yet)."""
    spm = pytest.importorskip("sentencepiece")
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Regex, normalizers
    from transformers import DebertaV2Tokenizer

    d = tmp_path_factory.mktemp("deberta-v3-tiny")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_sentences(400)), model_prefix=str(d / "spm"), vocab_size=300,
        model_type="unigram", pad_id=0, pad_piece="[PAD]", bos_id=1, bos_piece="[CLS]",
        eos_id=2, eos_piece="[SEP]", unk_id=3, unk_piece="[UNK]", character_coverage=1.0,
        minloglevel=2, num_threads=1)
    tok = DebertaV2Tokenizer.from_pretrained(d)
    # transformers 4's DebertaV2Converter normalizer, as in PairRM-hf's tokenizer.json.
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((d / "spm.model").read_bytes())
    tok.backend_tokenizer.normalizer = normalizers.Sequence([
        normalizers.Strip(), normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap),
        normalizers.Replace(Regex(" {2,}"), " ")])
    tok.save_pretrained(d)
    return d


@pytest.fixture
def deberta_tok(deberta_tok_dir):
    tok = pairrm.load_tokenizer(deberta_tok_dir)
    add_pairrm_tokens(tok)
    return tok


def tiny_config(tok):
    from transformers import DebertaV2Config
    m = add_pairrm_tokens(tok)
    # DeBERTa-v3-large's architecture keys at toy size; a wide init so that logits differ.
    return DebertaV2Config(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=512, type_vocab_size=0,
        relative_attention=True, max_relative_positions=-1, position_buckets=256,
        norm_rel_ebd="layer_norm", share_att_key=True, pos_att_type=["p2c", "c2p"],
        position_biased_input=False, pad_token_id=0, pooler_hidden_size=32,
        initializer_range=0.3, n_tasks=1, drop_out=0.05, source_prefix_id=m.source,
        cand1_prefix_id=m.candidate1, cand2_prefix_id=m.candidate2, cand_prefix_id=m.candidate)


@pytest.fixture(scope="session")
def tiny_pairrm_dir(tmp_path_factory, deberta_tok_dir):
    """A random PairRM in PairRM-hf's layout: config.json, model.safetensors, tokenizer."""
    tok = pairrm.load_tokenizer(deberta_tok_dir)
    torch.manual_seed(0)
    model = DebertaV2PairRM(tiny_config(tok))
    d = tmp_path_factory.mktemp("tiny-pairrm")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_pairrm(tiny_pairrm_dir):
    return PairRM.load(str(tiny_pairrm_dir), "cpu")


# ---------------------------------------------------------------------------------------
# The tokenizer and the inputs, token for token
# ---------------------------------------------------------------------------------------

def test_tokenizer_has_deberta_v3_layout(deberta_tok_dir):
    from tokenizers import Tokenizer
    tok = pairrm.load_tokenizer(deberta_tok_dir)
    assert [tok.pad_token_id, tok.cls_token_id, tok.sep_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    assert tok.mask_token_id == 300 and len(tok) == 301
    m = add_pairrm_tokens(tok)          # llm-blender's order: 128001…128004 in DeBERTa-v3
    assert (m.source, m.candidate1, m.candidate2, m.candidate) == (301, 302, 303, 304)
    assert add_pairrm_tokens(tok) == m and len(tok) == 305
    # "[SEP]" encodes to 3 ids, so llm-blender's collator takes its branch that truncates with
    # the tokenizer (mannually_add_sep_token False), which pairrm_inputs reproduces.
    assert tok.encode("[SEP]") == [1, 2, 2]
    # The file's normalizer is kept (leading spaces stripped, NFKC, tabs and newlines as
    # nmt_nfkc maps them), not transformers 5's rebuilt DeBERTa normalizer.
    raw = Tokenizer.from_file(str(deberta_tok_dir / "tokenizer.json"))
    text = "  Ｈｅｌｌｏ the\tsea\n\nof  time  "
    assert tok.encode(text) == raw.encode(text).ids


def llm_blender_inputs(tok, batch: list[dict], source_maxlength: int, candidate_maxlength: int):
    """llm-blender, literally: CrossCompareCollator.__call__ (collator.py; the branch without a
    manual [SEP], DeBERTa's), then for the pair (candidate 0 left, candidate 1 right)
    CrossCompareReranker._forward's marker swap, cat_ids and its trim of padding columns
    (ranker.py). Returns (input_ids, attention_mask)."""
    sep_token = tok.sep_token
    assert len(tok.encode(sep_token)) != 1
    source_prefix, candidate_prefix = "<|source|>", "<|candidate|>"
    cand_prefix_id, cand1_prefix_id, cand2_prefix_id = tok.convert_tokens_to_ids(
        ["<|candidate|>", "<|candidate1|>", "<|candidate2|>"])
    batch_source = [source_prefix + b["source"] for b in batch]
    batch_candidates = [[candidate_prefix + cand for cand in b["candidates"]] for b in batch]
    batch_source = [s.replace(sep_token, " ") for s in batch_source]
    batch_candidates = [[cand.replace(sep_token, " ") for cand in cands]
                        for cands in batch_candidates]

    def encode_texts(texts, max_length):     # batch_encode_plus, gone in transformers 5
        p = tok(texts, max_length=max_length, padding="max_length", return_tensors="pt",
                truncation=True)
        return p["input_ids"], p["attention_mask"]

    source_ids, source_masks = encode_texts(batch_source, source_maxlength)
    valid_positions = source_masks.any(dim=0)
    source_ids = source_ids[:, valid_positions]
    source_masks = source_masks[:, valid_positions]
    remaining_length = source_maxlength - valid_positions.sum().item()
    encoded = [encode_texts(c, candidate_maxlength + remaining_length // 2)
               for c in batch_candidates]
    candidate_ids = torch.cat([i[None] for i, _ in encoded], dim=0)
    candidate_masks = torch.cat([m[None] for _, m in encoded], dim=0)
    cand_valid_positions = candidate_masks.reshape(-1, candidate_masks.shape[-1]).any(dim=0)
    candidate_ids = candidate_ids[:, :, cand_valid_positions]
    candidate_masks = candidate_masks[:, :, cand_valid_positions]

    # _forward(source, candidate 0, candidate 1)
    cand1_ids, cand2_ids = candidate_ids[:, 0].clone(), candidate_ids[:, 1].clone()
    cand1_ids[torch.where(cand1_ids == cand_prefix_id)] = cand1_prefix_id
    cand2_ids[torch.where(cand2_ids == cand_prefix_id)] = cand2_prefix_id
    ids = [source_ids, cand1_ids, cand2_ids]
    masks = [source_masks, candidate_masks[:, 0], candidate_masks[:, 1]]
    bz = source_ids.shape[0]
    last_sep = [t.eq(tok.sep_token_id).nonzero()[:, 1].reshape(bz, -1)[:, -1] for t in ids]
    cat_ids = torch.stack([torch.cat([t[i, :s[i] + 1] for t, s in zip(ids, last_sep)] +
                                     [t[i, s[i] + 1:] for t, s in zip(ids, last_sep)])
                           for i in range(bz)])
    cat_masks = torch.stack([torch.cat([t[i, :s[i] + 1] for t, s in zip(masks, last_sep)] +
                                       [t[i, s[i] + 1:] for t, s in zip(masks, last_sep)])
                             for i in range(bz)])
    keep_column_mask = cat_masks.ne(0).any(dim=0)
    return cat_ids[:, keep_column_mask], cat_masks[:, keep_column_mask]


LONG = " ".join(_sentences(40, seed=1))                 # several hundred tokens


@pytest.mark.parametrize("source,a,b,limits", [
    ("hello!", "hi!", "Go away.", (24, 10)),                             # nothing cut
    (LONG, "hi!", "Thanks, you are a good man.", (24, 10)),              # the source is cut
    ("hello!", LONG, LONG[::-1], (24, 10)),        # candidates cut, with the source's budget
    ("Is [SEP] a token?", "Yes: [SEP] is.", "[SEP][SEP] no", (24, 10)),   # literal [SEP]
    (LONG * 5, LONG, "short", (1224, 412)),                              # PairRM's lengths
    ("A question?", LONG * 3, LONG * 2, (1224, 412)),
], ids=["short", "long-source", "long-candidates", "sep-in-text", "real-long-source",
        "real-long-candidates"])
def test_inputs_match_llm_blender_token_for_token(deberta_tok, source, a, b, limits):
    s_max, c_max = limits
    ref_ids, ref_mask = llm_blender_inputs(deberta_tok, [{"source": source, "candidates": [a, b]}],
                                           s_max, c_max)
    m = add_pairrm_tokens(deberta_tok)
    pair = encode_prompt(deberta_tok, source, [a, b], s_max, c_max).pair(0, 1, m)
    assert pair.input_ids == ref_ids[0].tolist() and bool(ref_mask.all())
    ids = pair.input_ids
    assert [ids[p] for p in pair.positions] == [m.source, m.candidate1, m.candidate2]
    assert ids.count(deberta_tok.sep_token_id) == 3 == ids.count(deberta_tok.cls_token_id)
    assert m.candidate not in ids


def test_truncation_budget_by_hand(deberta_tok):
    """S = 24, C = 10. A long source is cut to 24 tokens ([CLS] <|source|> … [SEP]) and each
    long candidate to 10 + ⌊0/2⌋ = 10. "hello!" alone is [CLS] <|source|> ▁hello ! [SEP]
    (n_x = 5), so a long candidate gets 10 + ⌊19/2⌋ = 19 tokens."""
    src = inputs.encode_source(deberta_tok, "hello!", 24)
    assert deberta_tok.convert_ids_to_tokens(src) == ["[CLS]", "<|source|>", "▁hello", "!",
                                                      "[SEP]"]
    assert candidate_budget(5, 24, 10) == 19 and candidate_budget(24, 24, 10) == 10
    enc = encode_prompt(deberta_tok, "hello!", [LONG, "hi"], 24, 10)
    assert len(enc.candidate_ids[0]) == 19 and enc.candidate_ids[0][-1] == 2
    enc = encode_prompt(deberta_tok, LONG, [LONG, "hi"], 24, 10)
    assert len(enc.source_ids) == 24 and len(enc.candidate_ids[0]) == 10
    assert candidate_budget(1224 + 412 * 0, 1224, 412) == 412       # a full source: C alone
    assert candidate_budget(2) == 412 + 611                          # the longest candidates


def test_inputs_match_the_model_card_tokenize_pair(deberta_tok):
    """PairRM-hf's card builds inputs its own way (prefixes put straight into the text, each
    candidate's budget ⌊(S + 2C − n_x)/2⌋); without a literal [SEP] it is the same sequence."""
    m = add_pairrm_tokens(deberta_tok)
    for source, a, b in [("hello!", "hi!", "f**k off!"), ("I love you!", LONG * 3, "x"),
                         (LONG * 5, LONG, LONG)]:
        max_length = 1224 + 2 * 412
        src = deberta_tok.encode("<|source|>" + source, max_length=1224, truncation=True)
        budget = (max_length - len(src)) // 2
        card = src + deberta_tok.encode("<|candidate1|>" + a, max_length=budget,
                                        truncation=True) + \
            deberta_tok.encode("<|candidate2|>" + b, max_length=budget, truncation=True)
        assert encode_prompt(deberta_tok, source, [a, b]).pair(0, 1, m).input_ids == card


# ---------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------

TRIPLES = [("hello!", "hi!", "Go away."), ("I love you!", "I hate you!", "I love you, too!"),
           ("What is the sea?", LONG, "Water."), (LONG, "yes", "no")]


def test_head_equals_a_plain_rederivation(tiny_pairrm):
    """C = mean(f([h_x; h_a]) − f([h_x; h_b])), f(u) = W₂ tanh(W₁ u + b₁) + b₂, with h the last
    hidden states of DebertaV2Model at the three markers (found by hand with torch.where)."""
    model = tiny_pairrm.model
    w1, w2 = model.head_layer[1], model.head_layer[4]
    got = tiny_pairrm.compare(*zip(*TRIPLES))
    for (x, a, b), c in zip(TRIPLES, got):
        ids = torch.tensor([tiny_pairrm.encode(x, [a, b]).pair(0, 1, tiny_pairrm.markers)
                            .input_ids])
        with torch.no_grad():
            h = model.pretrained_model(input_ids=ids).last_hidden_state[0]
            cfg = model.config
            at = [torch.where(ids[0] == t)[0].item() for t in (cfg.source_prefix_id,
                                                             cfg.cand1_prefix_id,
                                                             cfg.cand2_prefix_id)]

            def f(u):
                return F.linear(torch.tanh(F.linear(u, w1.weight, w1.bias)), w2.weight, w2.bias)
            hx, ha, hb = (h[i] for i in at)
            want = (f(torch.cat([hx, ha])) - f(torch.cat([hx, hb]))).mean().item()
            # The model card's call: no positions, padded to 2048, columns trimmed.
            padded = torch.zeros((1, 2048), dtype=torch.long)
            padded[0, :ids.shape[1]] = ids[0]
            card = model(input_ids=padded, attention_mask=(padded != 0).long()).logits.item()
        assert c == pytest.approx(want, abs=1e-5) and card == pytest.approx(want, abs=1e-5)
    assert max(got) - min(got) > 1e-3                       # the toy model tells pairs apart


def test_batching_changes_nothing(tiny_pairrm):
    """Pairs of very different lengths in one padded batch give their one-by-one logits."""
    one_by_one = [tiny_pairrm.compare([x], [a], [b])[0] for x, a, b in TRIPLES]
    budget, tiny_pairrm.max_batch_tokens = tiny_pairrm.max_batch_tokens, 10 ** 6
    try:
        batched = tiny_pairrm.compare(*zip(*TRIPLES))
    finally:
        tiny_pairrm.max_batch_tokens = budget
    assert batched == pytest.approx(one_by_one, abs=1e-5)


def test_bfloat16_logits_track_float32(tiny_pairrm):
    """The dtype PairRM runs in on a GPU, here on the CPU: the same logits to bf16 precision."""
    import copy
    bf16 = PairRM(copy.deepcopy(tiny_pairrm.model).to(torch.bfloat16), tiny_pairrm.tok, "cpu")
    want = tiny_pairrm.compare(*zip(*TRIPLES))
    assert bf16.compare(*zip(*TRIPLES)) == pytest.approx(want, abs=0.05)


def test_hf_layout_round_trip(tiny_pairrm_dir, tiny_pairrm, tmp_path):
    _, info = DebertaV2PairRM.from_pretrained(tiny_pairrm_dir, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    cfg = json.loads((tiny_pairrm_dir / "config.json").read_text())
    assert cfg["architectures"] == ["DebertaV2PairRM"] and cfg["source_prefix_id"] == 301
    tiny_pairrm.model.save_pretrained(tmp_path)
    tiny_pairrm.tok.save_pretrained(tmp_path)
    again = PairRM.load(str(tmp_path), "cpu")
    assert again.compare(*zip(*TRIPLES)) == tiny_pairrm.compare(*zip(*TRIPLES))


def test_llm_blender_layout_loads(tiny_pairrm_dir, tiny_pairrm, tmp_path):
    """llm-blender/PairRM's directory: its config.json is the ranker config (the backbone named
    by model_name), the weights carry the same keys, an old position_ids buffer included."""
    from safetensors.torch import save_file
    state = {k: v.contiguous() for k, v in tiny_pairrm.model.state_dict().items()}
    assert {k.split(".")[0] for k in state} == {"pretrained_model", "head_layer"}
    state["pretrained_model.embeddings.position_ids"] = torch.arange(512)[None]
    backbone = tmp_path / "backbone"
    tiny_config(tiny_pairrm.tok).save_pretrained(backbone)
    d = tmp_path / "PairRM"
    d.mkdir()
    save_file(state, d / "model.safetensors")
    tiny_pairrm.tok.save_pretrained(d)
    (d / "config.json").write_text(json.dumps({
        "ranker_type": "pairranker", "model_type": "deberta", "model_name": str(backbone),
        "source_maxlength": 1224, "candidate_maxlength": 412, "n_tasks": 1, "drop_out": 0.05}))
    assert "pretrained_model.embeddings.position_ids" not in pairrm.from_llm_blender_state_dict(state)
    loaded = PairRM.load(str(d), "cpu")
    assert loaded.compare(*zip(*TRIPLES)) == pytest.approx(tiny_pairrm.compare(*zip(*TRIPLES)),
                                                           abs=1e-6)
    del state["head_layer.4.bias"]
    save_file(state, d / "model.safetensors")
    with pytest.raises(SelfplayError, match="do not fit PairRM"):
        PairRM.load(str(d), "cpu")


def test_missing_weights_name_the_option(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SelfplayError, match=r"--pairrm_model 'nobody/no-such-pairrm': the PairRM "
                                            r"weights are not in the local Hugging Face cache"):
        PairRM.load("nobody/no-such-pairrm", "cpu")
    with pytest.raises(SelfplayError, match="--pairrm_model .*no such directory"):
        PairRM.load(str(tmp_path / "nowhere" / "x"), "cpu")
    with pytest.raises(SelfplayError, match="--pairrm_estimator 'best'"):
        PairRMJudge("best", "nobody/no-such-pairrm")


# ---------------------------------------------------------------------------------------
# Estimators and the judge
# ---------------------------------------------------------------------------------------

C = [[0.0, 1.0, -2.0],
     [0.5, 0.0, 0.0],
     [1.0, 3.0, 0.0]]


def _sig(x):
    return 1 / (1 + math.exp(-x))


def flat(m):
    return [v for row in m for v in row]


def test_paper_estimator_on_a_logit_matrix():
    """s_i = (1/3) Σ_j (C[i][j] − C[j][i]): s_0 = (0.5 − 3)/3, s_1 = (−0.5 − 3)/3,
    s_2 = (3 + 3)/3; P[i][j] = σ(s_i − s_j)."""
    s = [-2.5 / 3, -3.5 / 3, 2.0]
    p = prefs.paper_from_logits(C)
    for i in range(3):
        for j in range(3):
            assert p[i][j] == pytest.approx(_sig(s[i] - s[j]))
    assert prefs.paper_estimator(lambda _, a, b: C[int(a)][int(b)], [], "012") == p
    assert prefs.paper_from_logits([[7.0, 1.0], [0.0, -7.0]]) == \
        prefs.paper_from_logits([[0.0, 1.0], [0.0, 0.0]])        # the diagonal is never read


def test_pairwise_estimator_on_a_logit_matrix():
    """P[i][j] = ½(σ(C[i][j]) + σ(−C[j][i])): P[0][1] = ½(σ(1) + σ(−0.5)); P + Pᵀ = 1."""
    p = prefs.pairwise_from_logits(C)
    assert p[0][1] == pytest.approx(0.5 * (_sig(1.0) + _sig(-0.5)))
    assert p[2][0] == pytest.approx(0.5 * (_sig(1.0) + _sig(2.0)))
    for i in range(3):
        assert p[i][i] == 0.5
        for j in range(3):
            assert p[i][j] + p[j][i] == pytest.approx(1.0)
    assert prefs.pairwise_estimator(lambda _, a, b: C[int(a)][int(b)], [], "012") == p
    assert set(prefs.ESTIMATORS) == {"paper", "pairwise"}


def test_judge_compares_all_pairs_of_all_prompts_in_one_run(tiny_pairrm_dir, monkeypatch):
    judge = PairRMJudge("paper", str(tiny_pairrm_dir), "cpu")
    runs = []
    real_run = judge.pairrm.run
    monkeypatch.setattr(judge.pairrm, "run", lambda pairs, **kw: runs.append(len(pairs)) or
                        real_run(pairs, **kw))
    prompts = [[{"role": "user", "content": "hello!"}],
               [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Joke?"}],
               [{"role": "user", "content": " ".join(_sentences(6, seed=2))}]]
    responses = [["hi!", "Go away.", "Hello, how can I help?"], ["No.", "A joke.", "Sure", "?"],
                 ["yes", "no"]]
    mats = judge.matrices(prompts, responses, [{}] * 3)
    assert runs == [6 + 12 + 2]
    assert pairrm.source_text(prompts[1]) == "Joke?"
    for prompt, rs, p in zip(prompts, responses, mats):
        x = pairrm.source_text(prompt)
        c = [[0.0 if i == j else judge.pairrm.compare([x], [a], [b])[0]
              for j, b in enumerate(rs)] for i, a in enumerate(rs)]
        assert flat(p) == pytest.approx(flat(prefs.paper_from_logits(c)), abs=1e-6)
        prefs.check_matrix(p, len(rs), "pairrm")
    assert flat(judge.matrix(prompts[0], responses[0], {})) == pytest.approx(flat(mats[0]),
                                                                             abs=1e-6)


def test_rank_command_with_pairrm(tiny_pairrm_dir, tmp_path):
    from selfplay.cli import main
    from selfplay.data.shards import shard_name
    from selfplay.io import write_jsonl_atomic
    gen = tmp_path / "gen"
    gen.mkdir()
    rows = [{"prompt_id": f"p{i}", "prompt": [{"role": "user", "content": f"What is {i} + 1?"}],
             "reference": f"{i + 1}", "responses": [f"It is {i + 1}.", "No idea.", "Two!"],
             "response_tokens": [4, 3, 2], "finish_reasons": ["eos"] * 3, "extra": {}}
            for i in range(5)]
    write_jsonl_atomic(gen / shard_name("train", 0, 0, 1), rows)
    out = tmp_path / "ranked"
    assert main(["rank", "--input_dir", str(gen), "--output_dir", str(out), "--judge", "pairrm",
                 "--pairrm_model", str(tiny_pairrm_dir), "--pairrm_estimator", "pairwise"]) == 0
    ranked = [json.loads(x) for x in next(out.glob("*.jsonl")).read_text().splitlines()]
    assert [r["prompt_id"] for r in ranked] == [f"p{i}" for i in range(5)]
    judge = PairRMJudge("pairwise", str(tiny_pairrm_dir), "cpu")
    for r in ranked:
        assert r["judge"] == "pairrm" and len(r["win_rates"]) == 3
        prefs.check_matrix(r["matrix"], 3, "pairrm")
        want = judge.matrix(r["prompt"], r["responses"], {})
        assert flat(r["matrix"]) == pytest.approx(flat(want), abs=1e-6)
        assert r["win_rates"] == pytest.approx(prefs.win_rates(r["matrix"]))


# ---------------------------------------------------------------------------------------
# The real checkpoint, when it is cached
# ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_real_pairrm_hf_reproduces_its_model_card():
    """PairRM-hf's model card: logits [1.9003021717071533, -1.2547134160995483] (its run on
    CUDA in float32); llm-blender's README: ranks [[3, 1, 2], [1, 3, 2]] for its rank example."""
    from huggingface_hub import try_to_load_from_cache
    if not isinstance(try_to_load_from_cache("llm-blender/PairRM-hf", "model.safetensors"), str):
        pytest.skip("llm-blender/PairRM-hf is not in the local Hugging Face cache "
                    "(hf download llm-blender/PairRM-hf)")
    pairrm = PairRM.load("llm-blender/PairRM-hf", "cpu")
    logits = pairrm.compare(["hello!", "I love you!"], ["hi!", "I hate you!"],
                            ["f**k off!", "I love you, too!"])
    assert logits == pytest.approx([1.9003021717071533, -1.2547134160995483], abs=2e-3)
    mats = pairrm.comparison_matrices(
        ["hello, how are you!", "I love you!"],
        [["get out!", "hi! I am fine, thanks!", "bye!"],
         ["I love you too!", "I hate you!", "Thanks! You're a good guy!"]])
    ranks = []
    for c in mats:      # get_scores_from_cmps, then rank 1 = best
        s = [sum(c[i][j] - c[j][i] for j in range(3)) / 3 for i in range(3)]
        ranks.append([sorted(s, reverse=True).index(v) + 1 for v in s])
    assert ranks == [[3, 1, 2], [1, 3, 2]]
