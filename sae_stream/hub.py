"""Whether the Hugging Face Hub can be reached, asked without hanging: offline variables, proxies, a bounded
connect. (`datasets` and `huggingface_hub` would otherwise retry for minutes on a machine with no network.)"""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlparse


def _no_proxy(host: str) -> bool:
    """Whether NO_PROXY exempts `host` (comma-separated names and domain suffixes, or `*`)."""
    entries = (os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or "").split(",")
    names = [e.strip().lstrip(".").lower() for e in entries if e.strip()]
    return any(n == "*" or host.lower() == n or host.lower().endswith("." + n) for n in names)


def hub_unreachable_reason(timeout_s: float = 3.0,
                           offline_vars: tuple[str, ...] = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")) -> str | None:
    """Why the Hub can't be reached (one of `offline_vars` set, no connection within `timeout_s`), or None if it
    can. The connection goes to HTTPS_PROXY when one is set."""
    for var in offline_vars:
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if proxy and _no_proxy(urlparse(endpoint).hostname or ""):
        proxy = None
    if proxy and "://" not in proxy:  # `proxy.corp:3128` means http://proxy.corp:3128
        proxy = "http://" + proxy
    url = urlparse(proxy or endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    outcome: list[BaseException | None] = []

    def connect() -> None:  # in a thread because DNS lookups ignore socket timeouts
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(e)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout_s + 0.5)
    if not outcome:
        return f"no answer from {host}:{port} within {timeout_s:g} s"
    return None if outcome[0] is None else f"no connection to {host}:{port}: {outcome[0]}"
