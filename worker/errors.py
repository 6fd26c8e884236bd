"""Errors a user caused and can fix: each carries a stable ``code`` and a one-line ``message``.

Front ends show ``message`` as it is (the CLI on stderr with exit code 2, the bot as an ephemeral
reply), so it must say what is wrong and what would work. Nothing that raises one of these has
charged credits or written a clip.

    UserError
    ├── ImageRejected          the source picture cannot be used
    ├── InvalidParameters      an option is out of range or a combination cannot be honoured
    ├── InsufficientCredits    the price is more than the balance
    └── LimitReached           too many unfinished jobs (member or server), or the cooldown
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: a one-line message that says what is wrong and what would work."""

    code = "invalid_input"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_json(self) -> dict[str, str]:
        """``{"code": ..., "message": ...}`` for JSON output."""
        return {"code": self.code, "message": self.message}


class ImageRejected(UserError):
    """The source picture cannot be used (not an image, too small, too big, …)."""

    code = "image_rejected"


class InvalidParameters(UserError):
    """An option is out of range, or the chosen backend cannot honour a combination."""

    code = "invalid_parameters"


class InsufficientCredits(UserError):
    """The job costs more than the account can spend."""

    code = "insufficient_credits"

    def __init__(self, *, balance: int, price: int) -> None:
        super().__init__(
            f"this costs {price} credits but you have {balance}; "
            f"wait for tomorrow's free credits, ask an admin for a grant, or pick a shorter or cheaper option",
        )
        self.balance = balance
        self.price = price


class LimitReached(UserError):
    """The member or the server already has as many unfinished jobs as allowed, or is cooling down."""

    code = "limit_reached"
