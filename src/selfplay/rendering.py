"""The one way a prompt and a response become tokens, for generation, scoring, training, evaluation.

A prompt is rendered by the tokenizer's own chat template with the generation prompt, then
tokenized without special tokens: the template already holds whatever BOS the model expects,
so this never doubles it (the official SPPO code did). A response is its text's tokens plus the
end-of-turn token the model stops on, which is what generation produced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def prompt_text(tokenizer, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    return tokenizer(prompt_text(tokenizer, messages), add_special_tokens=False)["input_ids"]


def response_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


@dataclass
class Encoded:
    """One prompt + response sequence, truncated the way the trainer sees it."""
    input_ids: list[int]
    n_prompt: int            # the first n_prompt tokens are the prompt
    truncated: bool

    @property
    def n_response(self) -> int:
        return len(self.input_ids) - self.n_prompt


def truncate(p: list[int], r: list[int], max_length: int, max_prompt_length: int) -> Encoded:
    """Keep the prompt's end up to max_prompt_length, then cut the response to fit max_length.

    Per sequence, not per pair (the official code truncated both responses of a pair by the
    longer one): a stored reference log-prob then depends only on its own sequence.
    """
    truncated = False
    if len(p) + len(r) > max_length:
        truncated = True
        if len(p) > max_prompt_length:
            p = p[-max_prompt_length:]
        r = r[: max_length - len(p)]
    return Encoded(p + r, len(p), truncated)


def generation_prompt(p: list[int], max_new_tokens: int, max_length: int,
                      max_prompt_length: int) -> list[int]:
    """The prompt tokens a model answers at generation: those `truncate` keeps for a response
    of max_new_tokens, so that θ_t answers the prompt that training sees (a prompt whole,
    unless it is longer than max_prompt_length and the response could take it past
    max_length: then its end). max_length 0 keeps every prompt whole."""
    if max_length and len(p) > max_prompt_length and len(p) + max_new_tokens > max_length:
        return p[-max_prompt_length:]
    return p


def encode(tokenizer, prompt: list[dict[str, str]], response: str, max_length: int,
           max_prompt_length: int) -> Encoded:
    return truncate(prompt_ids(tokenizer, prompt), response_ids(tokenizer, response),
                    max_length, max_prompt_length)


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and response_mask for a list of sequences."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    resp = torch.zeros((len(batch), width), dtype=torch.bool)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        attn[i, :n] = 1
        resp[i, e.n_prompt:n] = True
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp}
