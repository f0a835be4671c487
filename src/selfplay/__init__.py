"""selfplay: self-play fine-tuning of language models (SPIN, SPPO)."""

__version__ = "0.1.0"
