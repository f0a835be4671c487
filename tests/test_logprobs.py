"""The one log-prob function against a naive full-logits computation, and the one rendering."""

import torch

from selfplay.logprobs import ResponseLogProbs, response_logps
from selfplay.rendering import Encoded, collate, encode, prompt_ids, response_ids, truncate

PROMPTS = [[{"role": "user", "content": "What is 2 + 2?"}],
           [{"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Name three colours of the rainbow, please."}],
           [{"role": "user", "content": "Hi"}]]
RESPONSES = ["4", "Red, orange and yellow are three of them.\nAnswer: red", "Hello there! How can "
             "I help you today? I can answer questions."]


def naive_logps(model, batch):
    """log softmax over the full [B, L, V] float32 logits: the reference implementation."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = logits.float().log_softmax(-1)[:, :-1]
    tok = logp.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (tok * batch["response_mask"][:, 1:]).sum(-1)


def _batch(tokenizer, max_length=1024, max_prompt_length=512):
    seqs = [encode(tokenizer, p, r, max_length, max_prompt_length)
            for p, r in zip(PROMPTS, RESPONSES)]
    return seqs, collate(seqs, tokenizer.pad_token_id)


def test_equals_naive_full_logits_on_a_padded_batch(tokenizer, tiny_model):
    seqs, batch = _batch(tokenizer)
    assert len({len(s.input_ids) for s in seqs}) == 3          # really padded
    with torch.no_grad():
        want = naive_logps(tiny_model, batch)
        for chunk in (1, 7, 1024):                              # chunking changes nothing
            got, n = response_logps(tiny_model, **batch, chunk_size=chunk)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert n.tolist() == [s.n_response for s in seqs]


def test_padding_does_not_change_a_sequence(tokenizer, tiny_model):
    seqs, batch = _batch(tokenizer)
    with torch.no_grad():
        together, _ = response_logps(tiny_model, **batch)
        alone = torch.cat([response_logps(tiny_model, **collate([s], tokenizer.pad_token_id))[0]
                           for s in seqs])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=0)


def test_gradients_equal_naive(tokenizer, tiny_model):
    _, batch = _batch(tokenizer)
    grads = []
    for fn in (lambda: naive_logps(tiny_model, batch).sum(),
               lambda: response_logps(tiny_model, **batch, chunk_size=5)[0].sum()):
        tiny_model.zero_grad()
        fn().backward()
        grads.append(torch.cat([p.grad.flatten() for p in tiny_model.parameters()]))
    tiny_model.zero_grad()
    torch.testing.assert_close(grads[1], grads[0], atol=1e-4, rtol=1e-4)


def test_module_wrapper(tokenizer, tiny_model):
    _, batch = _batch(tokenizer)
    with torch.no_grad():
        a, _ = ResponseLogProbs(tiny_model, chunk_size=3)(**batch)
        b, _ = response_logps(tiny_model, **batch)
    torch.testing.assert_close(a, b)


def test_rendering_is_the_chat_template(tokenizer):
    """prompt + response tokens are the template's own rendering of the whole conversation."""
    for p, r in zip(PROMPTS, RESPONSES):
        full = tokenizer.apply_chat_template(p + [{"role": "assistant", "content": r}],
                                             tokenize=False)
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        enc = encode(tokenizer, p, r, 4096, 2048)
        # The template closes a turn with "<|im_end|>\n"; a response ends at <|im_end|>, where
        # generation stops.
        assert ids[:len(enc.input_ids)] == enc.input_ids
        assert tokenizer.decode(ids[len(enc.input_ids):]) == "\n"
        assert enc.input_ids[-1] == tokenizer.eos_token_id


def test_no_double_bos(tokenizer):
    ids = prompt_ids(tokenizer, PROMPTS[0])
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id


def test_truncation_keeps_prompt_end_then_cuts_response():
    p, r = list(range(10)), list(range(100, 120))
    e = truncate(p, r, max_length=16, max_prompt_length=6)
    assert e.truncated and e.input_ids[:6] == p[-6:] and e.input_ids[6:] == r[:10]
    e2 = truncate(p[:3], r[:5], 16, 6)
    assert not e2.truncated and e2 == Encoded(p[:3] + r[:5], 3, False)


def test_response_ids_end_with_eos(tokenizer):
    assert response_ids(tokenizer, "Hello")[-1] == tokenizer.eos_token_id
