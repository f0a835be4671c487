"""What every engine takes and returns: sampling settings, a generation, stop tokens, seeds."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Protocol

from selfplay.rendering import generation_prompt


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0      # 0: greedy
    top_p: float = 1.0
    seed: int = 42
    batch_size: int = 16          # the HF engine's batch; vLLM schedules its own
    # Prompts are cut as training cuts them (rendering.generation_prompt); 0: kept whole.
    max_length: int = 0
    max_prompt_length: int = 0

    def prompt_tokens(self, ids: list[int]) -> list[int]:
        return generation_prompt(ids, self.max_new_tokens, self.max_length,
                                 self.max_prompt_length)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Generation:
    text: str
    n_tokens: int          # generated tokens, the end-of-turn token not counted
    finish_reason: str     # "eos" or "length"


class Engine(Protocol):
    """A loaded model that answers prompts; `close` frees its memory before training.

    A sampled row draws from its own random stream, seeded by `seeds[i]` (default: row i of
    stream "0", `row_seeds`), so that its answer does not depend on the rows batched with it:
    the K samples of a prompt can go in one pass, as K copies of it with K seeds."""
    name: str

    def generate(self, prompts: list[list[dict[str, str]]], settings: SamplingSettings,
                 seeds: Sequence[int] | None = None,
                 desc: str = "generate") -> list[Generation]: ...

    def close(self) -> None: ...


def stop_token_ids(generation_eos, tokenizer) -> list[int]:
    """The tokenizer's eos and the generation config's (one id or a list): the model stops on
    any of them, in both engines."""
    ids = {tokenizer.eos_token_id}
    ids.update(generation_eos if isinstance(generation_eos, (list, tuple))
               else [generation_eos] if generation_eos is not None else [])
    return sorted(i for i in ids if i is not None)


def stream_seed(seed: int, stream: str, index: int) -> int:
    """A 32-bit seed for row `index` of a named pass (a shard's sample k), so that samples are
    distinct and repeatable."""
    return int(hashlib.sha256(f"{seed}/{stream}/{index}".encode()).hexdigest()[:8], 16)


def row_seeds(settings: SamplingSettings, n: int, seeds: Sequence[int] | None) -> list[int]:
    """`seeds`, or row i of stream "0" for each of n rows; checked to be one per row."""
    if seeds is None:
        return [stream_seed(settings.seed, "0", i) for i in range(n)]
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} prompts")
    return list(seeds)
