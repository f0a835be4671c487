"""Whether the Hugging Face hub answers, asked once before anything would retry against it."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

TRUE = ("1", "true", "yes", "on")


def offline_by_choice() -> bool:
    return any(os.environ.get(v, "").lower() in TRUE
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def reachable(timeout: float = 3.0) -> bool:
    """False when the user set offline mode or the hub's host does not accept a connection."""
    if offline_by_choice():
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False
