"""PairRM (llm-blender) on plain transformers: DeBERTa-v3 reads a source and two candidates in
one sequence and says which candidate is better.

The model is `DebertaV2PairRM`, the architecture of llm-blender/PairRM-hf (llm_blender/pair_ranker/
pairrm.py): a DebertaV2Model `pretrained_model` and a head on the last hidden states at the
three markers (pairranker's CrossCompareReranker, ranker.py):

    h_x, h_a, h_b = hidden states at <|source|>, <|candidate1|>, <|candidate2|>
    f(u)          = W₂ tanh(W₁ u + b₁) + b₂        (head_layer: dropout, W₁, tanh, dropout, W₂)
    C(x, a, b)    = mean over the n_tasks outputs of f([h_x; h_a]) − f([h_x; h_b])

a logit, > 0 when a (left slot) is better. Inputs are built by `pairrm_inputs`, token for token
as llm-blender does. `PairRM.compare` runs many (x, a, b) triples per forward pass, longest
first so that each batch pads little; `PairRMJudge` scores all K·(K − 1) ordered pairs of every
prompt it is given in one such call and turns each K×K logit matrix into preferences with an
estimator of `preferences`.

Weights: a PairRM-hf directory or hub id (config.json with the marker ids, model.safetensors,
tokenizer), or the original llm-blender/PairRM checkpoint (its config.json is llm-blender's ranker
config; the weights have the same key names). Hub ids load from the local Hugging Face cache
first, without network.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoTokenizer, DebertaV2Config, DebertaV2Model, PreTrainedTokenizerFast
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.deberta_v2.modeling_deberta_v2 import DebertaV2PreTrainedModel

from selfplay import hub
from selfplay.errors import SelfplayError
from selfplay.judges import pairrm_inputs as inputs
from selfplay.judges.preferences import ESTIMATORS, Matrix
from selfplay.models import pick_device, pick_dtype

DEFAULT_PAIRRM = "llm-blender/PairRM-hf"
# The files a PairRM checkpoint needs (not llm-blender/PairRM's pickled training_args.bin).
CHECKPOINT_FILES = ["*.json", "*.model", "*.safetensors"]
# microsoft/deberta-v3-large, the backbone llm-blender/PairRM's ranker config names without
# carrying its config: the architecture keys of PairRM-hf's config.json.
DEBERTA_V3_LARGE = {
    "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
    "intermediate_size": 4096, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512, "type_vocab_size": 0,
    "initializer_range": 0.02, "layer_norm_eps": 1e-7, "relative_attention": True,
    "max_relative_positions": -1, "position_buckets": 256, "norm_rel_ebd": "layer_norm",
    "share_att_key": True, "pos_att_type": ["p2c", "c2p"], "position_biased_input": False,
    "pad_token_id": 0, "pooler_hidden_size": 1024, "pooler_dropout": 0,
    "pooler_hidden_act": "gelu"}
PROGRESS_MIN_PAIRS = 256      # fewer comparisons than this run without a progress bar


class DebertaV2PairRM(DebertaV2PreTrainedModel):
    """PairRM-hf's model: the parameter names are its checkpoint's (`pretrained_model.*`,
    `head_layer.{1,4}.*`), which are also llm-blender/PairRM's."""

    base_model_prefix = "pretrained_model"

    def __init__(self, config: DebertaV2Config):
        super().__init__(config)
        self.pretrained_model = DebertaV2Model(config)
        h, p = config.hidden_size, getattr(config, "drop_out", 0.05)
        self.head_layer = nn.Sequential(nn.Dropout(p), nn.Linear(2 * h, h), nn.Tanh(),
                                        nn.Dropout(p), nn.Linear(h, getattr(config, "n_tasks", 1)))
        self.post_init()

    def marker_ids(self) -> tuple[int, int, int]:
        c = self.config
        return c.source_prefix_id, c.cand1_prefix_id, c.cand2_prefix_id

    def marker_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, 3): the first <|source|>, <|candidate1|>, <|candidate2|> of each row."""
        cols = []
        for token in self.marker_ids():
            hit = input_ids == token
            if not bool(hit.any(dim=1).all()):
                raise ValueError(f"a row of input_ids lacks the PairRM marker id {token}")
            cols.append(hit.int().argmax(dim=1))
        return torch.stack(cols, dim=1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, **kwargs) -> SequenceClassifierOutput:
        """logits[r] = C(x, a, b) of row r; `positions` (B, 3) says where its markers are
        (default: their first occurrence, as PairRM-hf's forward finds them). Other inputs
        (token_type_ids) are ignored: DeBERTa-v3 has no token type embeddings."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # As PairRM-hf's forward: columns that are padding in every row cost time only
        # (the model card pads to 2048). Only trailing ones go, so positions stay valid.
        used = attention_mask.ne(0).any(dim=0).nonzero()
        n = int(used.max()) + 1 if len(used) else input_ids.shape[1]
        input_ids, attention_mask = input_ids[:, :n], attention_mask[:, :n]
        if positions is None:
            positions = self.marker_positions(input_ids)
        hidden = self.pretrained_model(input_ids=input_ids,
                                       attention_mask=attention_mask).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        x, a, b = (hidden[rows, positions[:, k]] for k in range(3))
        left = self.head_layer(torch.cat([x, a], dim=-1))
        right = self.head_layer(torch.cat([x, b], dim=-1))
        return SequenceClassifierOutput(logits=(left - right).mean(dim=-1))


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------

def _cached_snapshot(spec: str) -> Path | None:
    from huggingface_hub import snapshot_download
    try:
        d = Path(snapshot_download(spec, allow_patterns=CHECKPOINT_FILES, local_files_only=True))
    except (OSError, ValueError):       # not cached (or not a valid repo id)
        return None
    return d if (d / "config.json").is_file() and _has_weights(d) else None


def _has_weights(d: Path) -> bool:
    return (d / "model.safetensors").is_file() or (d / "pytorch_model.bin").is_file()


def checkpoint_dir(spec: str) -> Path:
    """A local directory, or a hub id's snapshot: the local cache first, the hub only if the
    snapshot is not cached and the hub answers."""
    p = Path(spec).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise SelfplayError(f"--pairrm_model {spec}: the directory holds no config.json, so "
                                "it is not a PairRM checkpoint.")
        return p
    if p.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise SelfplayError(f"--pairrm_model {spec}: no such directory (give a PairRM "
                            f"checkpoint directory or a hub id such as {DEFAULT_PAIRRM}).")
    from huggingface_hub import snapshot_download
    cached = _cached_snapshot(spec)
    if cached is not None:
        return cached
    if not hub.reachable():
        raise SelfplayError(f"--pairrm_model {spec!r}: the PairRM weights are not in the local "
                            "Hugging Face cache and the hub cannot be reached; download them "
                            f"where there is network (`hf download {spec}`) or pass a local "
                            "checkpoint directory.")
    try:
        return Path(snapshot_download(spec, allow_patterns=CHECKPOINT_FILES))
    except (OSError, ValueError) as e:
        raise SelfplayError(f"--pairrm_model {spec!r}: could not download it from the hub "
                            f"({type(e).__name__}: {e}).") from None


def load_tokenizer(d: Path):
    """The checkpoint's tokenizer, its tokenizer.json pipeline as saved: transformers 5's
    DebertaV2Tokenizer would rebuild the normalizer, while llm-blender tokenized with the
    pipeline transformers 4 converted from spm.model and PairRM saved as tokenizer.json."""
    if (d / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(d)
    if (d / "spm.model").is_file() or (d / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(d)
    raise SelfplayError(f"--pairrm_model {d}: no tokenizer (tokenizer.json or spm.model) in it.")


def _read_weights(d: Path) -> dict[str, torch.Tensor]:
    if (d / "model.safetensors").is_file():
        from safetensors.torch import load_file
        return load_file(d / "model.safetensors")
    return torch.load(d / "pytorch_model.bin", map_location="cpu", weights_only=True)


def from_llm_blender_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """llm-blender/PairRM's keys (its CrossCompareReranker's `pretrained_model.*`,
    `head_layer.*`) are DebertaV2PairRM's; older transformers also saved the embeddings'
    `position_ids` buffer, which is rebuilt, not loaded."""
    return {k: v for k, v in state_dict.items() if not k.endswith("embeddings.position_ids")}


def _load_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], where: Path) -> None:
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:           # shapes that differ from the backbone's config
        raise SelfplayError(f"--pairrm_model {where}: its weights do not fit PairRM "
                            f"({str(e).splitlines()[-1].strip()}).") from None
    if missing or unexpected:
        raise SelfplayError(f"--pairrm_model {where}: its weights do not fit PairRM (missing "
                            f"{missing[:3]}, unexpected {unexpected[:3]}).")


def _backbone_config(name: str, where: Path) -> DebertaV2Config:
    if name.rstrip("/").endswith("microsoft/deberta-v3-large"):
        return DebertaV2Config(**DEBERTA_V3_LARGE)
    try:
        cfg = DebertaV2Config.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        cfg = None
    if cfg is None:
        raise SelfplayError(f"--pairrm_model {where}: its ranker config names the backbone "
                            f"{name!r}, which is neither microsoft/deberta-v3-large nor a cached "
                            "DeBERTa-v2 config.")
    return cfg


def _load_llm_blender_checkpoint(d: Path, ranker: dict, tok, markers: inputs.MarkerIds):
    if ranker.get("ranker_type") != "pairranker":
        raise SelfplayError(f"--pairrm_model {d}: its config.json is an llm-blender ranker of "
                            f"type {ranker.get('ranker_type')!r}, not a pairranker.")
    state = from_llm_blender_state_dict(_read_weights(d))
    cfg = _backbone_config(str(ranker.get("model_name", "")), d)
    emb = state.get("pretrained_model.embeddings.word_embeddings.weight")
    cfg.vocab_size = emb.shape[0] if emb is not None else len(tok)
    cfg.n_tasks, cfg.drop_out = ranker.get("n_tasks", 1), ranker.get("drop_out", 0.05)
    cfg.source_prefix_id, cfg.cand1_prefix_id = markers.source, markers.candidate1
    cfg.cand2_prefix_id, cfg.cand_prefix_id = markers.candidate2, markers.candidate
    cfg.architectures = ["DebertaV2PairRM"]
    model = DebertaV2PairRM(cfg)
    _load_strict(model, state, d)
    return model


def _check_markers(config, markers: inputs.MarkerIds, where: Path) -> None:
    want = {"source_prefix_id": markers.source, "cand1_prefix_id": markers.candidate1,
            "cand2_prefix_id": markers.candidate2, "cand_prefix_id": markers.candidate}
    for key, tok_id in want.items():
        have = getattr(config, key, None)
        if have is None:
            setattr(config, key, tok_id)
        elif have != tok_id:
            raise SelfplayError(f"--pairrm_model {where}: config.json has {key} = {have} but "
                                f"its tokenizer gives {tok_id}.")
    if max(want.values()) >= config.vocab_size:
        raise SelfplayError(f"--pairrm_model {where}: the PairRM marker ids do not fit its "
                            f"vocabulary of {config.vocab_size}.")


class PairRM:
    """A loaded PairRM: model, tokenizer and device; `compare` and `comparison_matrices`."""

    def __init__(self, model: DebertaV2PairRM, tok, device: torch.device | str = "cpu",
                 source_max_length: int = inputs.SOURCE_MAX_LENGTH,
                 candidate_max_length: int = inputs.CANDIDATE_MAX_LENGTH,
                 max_batch_tokens: int = 0):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tok, self.markers = tok, inputs.add_pairrm_tokens(tok)
        self.source_max_length, self.candidate_max_length = source_max_length, candidate_max_length
        # Padded tokens per forward pass: 16 full-length (2048) pairs on a GPU, 4 on a CPU.
        self.max_batch_tokens = max_batch_tokens or (32768 if self.device.type == "cuda"
                                                     else 8192)

    @classmethod
    def load(cls, spec: str = DEFAULT_PAIRRM, device: str = "auto") -> PairRM:
        """bfloat16 on CUDA, float32 elsewhere."""
        dev = pick_device(device)
        dtype = pick_dtype("auto", dev)
        d = checkpoint_dir(spec)
        tok = load_tokenizer(d)
        markers = inputs.add_pairrm_tokens(tok)
        cfg = json.loads((d / "config.json").read_text())
        lengths = {}
        if not _has_weights(d):
            raise SelfplayError(f"--pairrm_model {spec!r}: {d} holds no weights "
                                "(model.safetensors or pytorch_model.bin).")
        if "ranker_type" in cfg:            # llm-blender/PairRM: its own ranker config
            model = _load_llm_blender_checkpoint(d, cfg, tok, markers).to(dtype)
            lengths = {"source_max_length": cfg.get("source_maxlength"),
                       "candidate_max_length": cfg.get("candidate_maxlength")}
            lengths = {k: v for k, v in lengths.items() if v}
        else:
            model, info = DebertaV2PairRM.from_pretrained(d, dtype=dtype,
                                                          output_loading_info=True)
            bad = info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]
            if bad:
                raise SelfplayError(f"--pairrm_model {spec!r}: its weights do not fit PairRM "
                                    f"({sorted(bad)[:3]} missing, unexpected or mismatched).")
        _check_markers(model.config, markers, d)
        return cls(model, tok, dev, **lengths)

    # -----------------------------------------------------------------------------------

    @torch.no_grad()
    def run(self, pairs: Sequence[inputs.PairInput], desc: str = "pairrm") -> list[float]:
        """C of every pair, batched: longest first, each batch at most max_batch_tokens
        padded tokens (at least one pair)."""
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i].input_ids))
        out = [0.0] * len(pairs)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        bar = tqdm(total=len(pairs), desc=desc, unit="pair", mininterval=1.0, leave=False,
                   disable=len(pairs) < PROGRESS_MIN_PAIRS)
        s = 0
        while s < len(order):
            width = len(pairs[order[s]].input_ids)
            n = max(1, min(len(order) - s, self.max_batch_tokens // width))
            batch = [pairs[i] for i in order[s:s + n]]
            ids = torch.full((n, width), pad, dtype=torch.long)
            mask = torch.zeros((n, width), dtype=torch.long)
            for r, p in enumerate(batch):
                ids[r, :len(p.input_ids)] = torch.tensor(p.input_ids)
                mask[r, :len(p.input_ids)] = 1
            pos = torch.tensor([p.positions for p in batch])
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                positions=pos.to(self.device)).logits.float().tolist()
            for i, v in zip(order[s:s + n], logits):
                out[i] = v
            bar.update(n)
            s += n
        bar.close()
        return out

    def encode(self, source: str, candidates: Sequence[str]):
        return inputs.encode_prompt(self.tok, source, candidates, self.source_max_length,
                                    self.candidate_max_length)

    def compare(self, sources: Sequence[str], cands_a: Sequence[str],
                cands_b: Sequence[str]) -> list[float]:
        """C(x, a, b) for each triple: > 0 when a is better (llm-blender's compare with
        mode "[A,B]", return_logits=True)."""
        if not len(sources) == len(cands_a) == len(cands_b):
            raise ValueError("compare needs as many sources as candidates on each side")
        pairs = [self.encode(x, [a, b]).pair(0, 1, self.markers)
                 for x, a, b in zip(sources, cands_a, cands_b)]
        return self.run(pairs)

    def comparison_matrices(self, sources: Sequence[str],
                            candidates: Sequence[Sequence[str]]) -> list[Matrix]:
        """For each source, C[i][j] = C(x, y_i, y_j) over its candidates (0 on the diagonal):
        every ordered pair of every source in one batched run."""
        pairs, where = [], []
        for n, (x, ys) in enumerate(zip(sources, candidates)):
            enc = self.encode(x, ys)
            for i in range(len(ys)):
                for j in range(len(ys)):
                    if i != j:
                        pairs.append(enc.pair(i, j, self.markers))
                        where.append((n, i, j))
        mats = [[[0.0] * len(ys) for _ in ys] for ys in candidates]
        for (n, i, j), v in zip(where, self.run(pairs)):
            mats[n][i][j] = v
        return mats


# ---------------------------------------------------------------------------------------
# The judge
# ---------------------------------------------------------------------------------------

def source_text(prompt: list[dict]) -> str:
    """What PairRM reads as the source: the last user message."""
    for m in reversed(prompt):
        if m.get("role") == "user":
            return str(m.get("content", ""))
    return str(prompt[-1].get("content", "")) if prompt else ""


class PairRMJudge:
    """SPPO's PairRM judge: C over all ordered pairs, then an estimator (`preferences`)."""

    name = "pairrm"

    def __init__(self, estimator: str = "paper", model: str = DEFAULT_PAIRRM,
                 device: str = "auto"):
        if estimator not in ESTIMATORS:
            raise SelfplayError(f"--pairrm_estimator {estimator!r} is not one of: "
                                f"{', '.join(ESTIMATORS)}.")
        self.estimate = ESTIMATORS[estimator]
        self.pairrm = PairRM.load(model, device)

    def logits(self, prompts: Sequence[list[dict]],
               responses: Sequence[Sequence[str]]) -> list[Matrix]:
        return self.pairrm.comparison_matrices([source_text(p) for p in prompts], responses)

    def matrices(self, prompts: Sequence[list[dict]], responses: Sequence[Sequence[str]],
                 extras: Sequence[dict]) -> list[Matrix]:
        return [self.estimate(c) for c in self.logits(prompts, responses)]

    def matrix(self, prompt: list[dict], responses: Sequence[str], extra: dict) -> Matrix:
        return self.matrices([prompt], [responses], [extra])[0]
