"""What a local model directory must hold, checked before any loader reads it: config files
that are JSON objects, weights that are whole (every file its index names, every
safetensors file as long as its header says), a tokenizer; and a GGUF file that is one.
Each problem is one sentence naming the file."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from selfplay.errors import SelfplayError

IDENTITY_FILES = ("config.json", "adapter_config.json")
# Any of these makes a directory's tokenizer loadable (a fast one, or a slow one's vocabulary).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "spm.model")
GGUF_MAGIC = b"GGUF"


def check_configs(root: Path) -> None:
    """A checkpoint's config files must be JSON objects: a cut or garbled one is named here,
    before any loader reads it."""
    for name in IDENTITY_FILES:
        f = root / name
        if not f.is_file():
            continue
        try:
            ok = isinstance(json.loads(f.read_text(encoding="utf-8")), dict)
        except ValueError:           # JSONDecodeError, UnicodeDecodeError
            ok = False
        if not ok:
            raise SelfplayError(f"model {root}: {name} is not a JSON object; the checkpoint is "
                                "corrupt or was cut short (an interrupted save or copy?).")


def _is_weight_file(p: Path) -> bool:
    # Trainer checkpoints hold other .bin files (training_args.bin, optimizer.bin): not weights.
    return p.suffix == ".safetensors" or (
        p.suffix == ".bin" and p.name.startswith(("pytorch_model", "adapter_model")))


def _safetensors_problem(p: Path) -> str | None:
    """Why a .safetensors file cannot be whole, from its header alone; None if it can."""
    size = p.stat().st_size
    with p.open("rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or 8 + n > size:
            return f"is cut short ({size} bytes, less than its own header)"
        try:
            meta = json.loads(fh.read(n))
            end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"),
                      default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "has a corrupt header"
    if 8 + n + end != size:
        return (f"holds {size} bytes where its header describes {8 + n + end}"
                + (": it is cut short" if size < 8 + n + end else ""))
    return None


def check_weights(root: Path) -> None:
    """A local checkpoint's weights, checked before a loader reads them: none at all, a shard
    its index names but lacks, or a file cut short is one sentence naming the file."""
    weights = sorted(p for p in root.iterdir() if p.is_file() and _is_weight_file(p))
    if not weights:
        has = " and ".join(n for n in IDENTITY_FILES if (root / n).is_file())
        raise SelfplayError(f"model {root} holds {has} but no weights (*.safetensors or "
                            "pytorch_model*.bin): the checkpoint is incomplete.")
    for index in sorted(root.glob("*.index.json")):
        try:
            named = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, TypeError, KeyError, AttributeError):
            raise SelfplayError(f"model {root}: {index.name} is not a readable weight index; "
                                "the checkpoint is corrupt.") from None
        lost = sorted(n for n in named if not (root / n).is_file())
        if lost:
            raise SelfplayError(f"model {root}: {index.name} names {len(lost)} weight file(s) "
                                f"that are missing ({lost[0]} first): the checkpoint is "
                                "incomplete.")
    for p in weights:
        if p.suffix == ".safetensors":
            why = _safetensors_problem(p)
        else:       # torch.save's zip archive: its directory sits at the end of the file
            with p.open("rb") as fh:
                why = "is cut short" if fh.read(4) == b"PK\x03\x04" and \
                    not zipfile.is_zipfile(p) else None
        if why:
            raise SelfplayError(f"model {root}: {p.name} {why}; the checkpoint is incomplete or "
                                "corrupt (an interrupted save or copy?).")


def check_tokenizer(root: Path) -> None:
    """A local checkpoint must carry its tokenizer: every stage renders prompts with it."""
    if not any((root / n).is_file() for n in TOKENIZER_FILES):
        raise SelfplayError(f"model {root} holds no tokenizer ({', '.join(TOKENIZER_FILES[:2])}"
                            "): the checkpoint is incomplete; copy its base model's tokenizer "
                            "files into it.")


def check_gguf(path: Path) -> None:
    """A .gguf file must start with GGUF's magic bytes (a file merely named so does not)."""
    with path.open("rb") as fh:
        head = fh.read(4)
    if head != GGUF_MAGIC:
        raise SelfplayError(f"model {path} is not a GGUF file (it does not start with GGUF's "
                            "magic bytes).")
