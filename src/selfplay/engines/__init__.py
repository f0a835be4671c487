"""Generation engines: `hf` (our batched decoder on transformers models)."""
