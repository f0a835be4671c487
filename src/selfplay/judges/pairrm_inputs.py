"""PairRM's input sequences, token for token as llm-blender builds them: pure functions over a
tokenizer, no model.

One comparison of candidates A and B for a source x is one sequence of three parts, each
tokenized on its own with its own [CLS] … [SEP]:

    [CLS] <|source|> x [SEP]  [CLS] <|candidate1|> A [SEP]  [CLS] <|candidate2|> B [SEP]

as llm-blender's CrossCompareCollator encodes them (llm_blender/pair_ranker/collator.py,
CrossCompareCollator.__call__) and CrossCompareReranker.cat_ids joins them (ranker.py:
each part cut after its last [SEP], padding moved to the end):

  - a literal "[SEP]" in any text becomes a space first, or it would end its part early;
  - the source part is cut to at most S = 1224 tokens, specials included;
  - each candidate part to at most C + ⌊(S − n_x) / 2⌋ tokens, C = 412, n_x the length of the
    source part: a short source lends half of its unused budget to each candidate, so a
    sequence never exceeds S + 2C = 2048 tokens;
  - candidates are tokenized behind the neutral <|candidate|> marker, which becomes
    <|candidate1|> in the left slot and <|candidate2|> in the right one (ranker.py, _forward).

llm-blender takes n_x as the longest source of its batch; here it is each source's own length,
what llm-blender computes with batch_size=1, as SPPO's ranking script runs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

SOURCE_TOKEN = "<|source|>"
CANDIDATE1_TOKEN = "<|candidate1|>"
CANDIDATE2_TOKEN = "<|candidate2|>"
CANDIDATE_TOKEN = "<|candidate|>"
# llm-blender's order of tokenizer.add_tokens: with DeBERTa-v3 ([MASK] = 128000) this gives
# the ids 128001…128004 that PairRM-hf's config records.
PAIRRM_TOKENS = (SOURCE_TOKEN, CANDIDATE1_TOKEN, CANDIDATE2_TOKEN, CANDIDATE_TOKEN)
SOURCE_MAX_LENGTH = 1224
CANDIDATE_MAX_LENGTH = 412


@dataclass(frozen=True)
class MarkerIds:
    """Token ids of the four PairRM markers in one tokenizer."""
    source: int
    candidate1: int
    candidate2: int
    candidate: int


def add_pairrm_tokens(tok) -> MarkerIds:
    """Add the markers to `tok` as llm-blender does (those it has already keep their ids)."""
    tok.add_tokens(list(PAIRRM_TOKENS))
    return MarkerIds(*tok.convert_tokens_to_ids(list(PAIRRM_TOKENS)))


def _clean(tok, text: str) -> str:
    return text.replace(tok.sep_token, " ")


def encode_source(tok, source: str, max_length: int = SOURCE_MAX_LENGTH) -> list[int]:
    """[CLS] <|source|> source [SEP], cut to `max_length` tokens (the [SEP] kept)."""
    return tok(_clean(tok, SOURCE_TOKEN + source), max_length=max_length,
               truncation=True)["input_ids"]


def candidate_budget(source_len: int, source_max_length: int = SOURCE_MAX_LENGTH,
                     candidate_max_length: int = CANDIDATE_MAX_LENGTH) -> int:
    """C + ⌊(S − n_x) / 2⌋: the candidate length allowed beside a source part of n_x tokens."""
    return candidate_max_length + (source_max_length - source_len) // 2


def encode_candidate(tok, candidate: str, max_length: int) -> list[int]:
    """[CLS] <|candidate|> candidate [SEP], cut to `max_length` tokens."""
    return tok(_clean(tok, CANDIDATE_TOKEN + candidate), max_length=max_length,
               truncation=True)["input_ids"]


@dataclass(frozen=True)
class PairInput:
    """One comparison's token ids and where its three markers sit."""
    input_ids: list[int]
    positions: tuple[int, int, int]     # <|source|>, <|candidate1|>, <|candidate2|>


def join_pair(source_ids: Sequence[int], a_ids: Sequence[int], b_ids: Sequence[int],
              markers: MarkerIds) -> PairInput:
    """Source, A in the left slot, B in the right one.

    Each part's marker follows its [CLS] at index 1. llm-blender swaps every <|candidate|> id
    of a part, which differs from swapping this one only when a text itself spells a marker;
    then its model fails (two markers in a row), while positions keep this one working.
    """
    a, b = list(a_ids), list(b_ids)
    assert a[1] == markers.candidate and b[1] == markers.candidate, "not encode_candidate ids"
    a[1], b[1] = markers.candidate1, markers.candidate2
    n = len(source_ids)
    return PairInput(list(source_ids) + a + b, (1, n + 1, n + len(a) + 1))


@dataclass(frozen=True)
class EncodedPrompt:
    """A source and its K candidates, each encoded once; any ordered pair joins from them."""
    source_ids: list[int]
    candidate_ids: list[list[int]]

    def pair(self, i: int, j: int, markers: MarkerIds) -> PairInput:
        return join_pair(self.source_ids, self.candidate_ids[i], self.candidate_ids[j], markers)


def encode_prompt(tok, source: str, candidates: Sequence[str],
                  source_max_length: int = SOURCE_MAX_LENGTH,
                  candidate_max_length: int = CANDIDATE_MAX_LENGTH) -> EncodedPrompt:
    """The parts of every comparison between `candidates` for `source` (K tokenizations, not
    K·(K − 1): a candidate's part does not depend on its slot or its opponent)."""
    src = encode_source(tok, source, source_max_length)
    budget = candidate_budget(len(src), source_max_length, candidate_max_length)
    return EncodedPrompt(src, [encode_candidate(tok, c, budget) for c in candidates])


def build_pair(tok, source: str, a: str, b: str, markers: MarkerIds,
               source_max_length: int = SOURCE_MAX_LENGTH,
               candidate_max_length: int = CANDIDATE_MAX_LENGTH) -> PairInput:
    """The sequence comparing `a` (left) with `b` (right) for `source`."""
    enc = encode_prompt(tok, source, [a, b], source_max_length, candidate_max_length)
    return enc.pair(0, 1, markers)
