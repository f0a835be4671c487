"""What every engine takes and returns: sampling settings, a generation, stop tokens, seeds."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0      # 0: greedy
    top_p: float = 1.0
    seed: int = 42
    batch_size: int = 16          # the HF engine's batch; vLLM schedules its own

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Generation:
    text: str
    n_tokens: int          # generated tokens, the end-of-turn token not counted
    finish_reason: str     # "eos" or "length"


class Engine(Protocol):
    """A loaded model that answers prompts; `close` frees its memory before training."""
    name: str

    def generate(self, prompts: list[list[dict[str, str]]], settings: SamplingSettings,
                 stream: str = "0", desc: str = "generate") -> list[Generation]: ...

    def close(self) -> None: ...


def stop_token_ids(generation_eos, tokenizer) -> list[int]:
    """The tokenizer's eos and the generation config's (one id or a list): the model stops on
    any of them, in both engines."""
    ids = {tokenizer.eos_token_id}
    ids.update(generation_eos if isinstance(generation_eos, (list, tuple))
               else [generation_eos] if generation_eos is not None else [])
    return sorted(i for i in ids if i is not None)


def stream_seed(seed: int, stream: str, index: int) -> int:
    """A 32-bit seed for one batch (HF) or one request (vLLM) of a named pass, so that sampled
    passes are distinct and repeatable."""
    return int(hashlib.sha256(f"{seed}/{stream}/{index}".encode()).hexdigest()[:8], 16)
