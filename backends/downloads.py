"""Where backends may fetch generated files from: one host check for every provider.

Generated videos are downloaded only from the provider's own hosts (``settings.provider_download_hosts``,
plus whatever a backend adds, such as a Cog server's address), never from wherever a response points.
"""

from __future__ import annotations

from collections.abc import Iterable


def host_allowed(host: str, patterns: Iterable[str]) -> bool:
    """Whether ``host`` is one of ``patterns``; ``*.example.com`` matches its subdomains, not itself."""
    host = host.lower().rstrip(".")
    for pattern in patterns:
        pattern = pattern.strip().lower()
        if pattern and (host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:]))):
            return True
    return False
