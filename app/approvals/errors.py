from __future__ import annotations

from app.errors import Conflict, NotFound


class ApprovalNotFound(NotFound):
    type = "approval-not-found"


class AlreadyDecided(Conflict):
    """The approval is no longer pending: decided, expired or cancelled first (``status_now`` says how)."""

    type = "approval-decided"
    title = "Already decided"
