"""Signed URLs of the web endpoint: webhooks for one attempt, links to one clip.

Each carries an HMAC of what it points at under ``settings.webhook_key()``, so nobody can guess a
URL that acts on a job or fetches a clip; the web endpoint (``worker.web``) checks them.
"""

from __future__ import annotations

import hashlib
import hmac


def _sign(secret: bytes, what: str) -> str:
    return hmac.new(secret, what.encode(), hashlib.sha256).hexdigest()[:32]


def webhook_token(secret: bytes, attempt_id: int) -> str:
    """The token that authorises webhooks about attempt ``attempt_id``."""
    return _sign(secret, f"attempt:{attempt_id}")


def webhook_path(secret: bytes, backend: str, attempt_id: int) -> str:
    """The path a backend gives its provider for webhooks about one attempt."""
    return f"/webhooks/{backend}/{attempt_id}/{webhook_token(secret, attempt_id)}"


def clip_path(secret: bytes, clip_id: int) -> str:
    """The path of the signed link to clip ``clip_id`` (append it to ``settings.public_url``)."""
    return f"/clips/{clip_id}/{_sign(secret, f'clip:{clip_id}')}/clip.mp4"
