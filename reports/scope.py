"""Who is looking: the viewer's role, and which roll-up rows answer for them.

Which *messages* a user may see is decided in one place only, `Message.objects.visible_to` (gateway). This
module maps the same roles onto roll-up scopes: an administrator reads the "*" rows (all mail), a domain
administrator the rows of their domains, and a user, whose mail is a small slice, is answered from the raw
log through `visible_to` (no roll-up scope exists per address).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.access import Role, domains_of, may_download, role_of
from gateway.models import Message

from .models import ALL_SCOPE


def is_admin(user) -> bool:
    return role_of(user) == Role.ADMIN


def can_download(user) -> bool:
    """The original of a message holds everything; only administrators and domain administrators get it."""
    return may_download(user)


@dataclass(frozen=True)
class Viewer:
    user: object
    role: str
    # Roll-up scopes that add up to this viewer's mail; None: read the raw log (through visible_to).
    scopes: tuple[str, ...] | None
    # Users' numbers are computed from their own messages once per window and request (reports.stats).
    live: list = field(default_factory=list, compare=False, repr=False)

    @property
    def uses_rollups(self) -> bool:
        return self.scopes is not None

    def messages(self):
        return Message.objects.visible_to(self.user)


def viewer_for(user) -> Viewer:
    role = role_of(user)
    if role == Role.ADMIN:
        return Viewer(user, role, (ALL_SCOPE,))
    if role == Role.DOMAIN_ADMIN:
        domains = tuple(sorted(domains_of(user)))
        # A domain administrator of several domains sums their rows: a message between two of their own
        # domains is counted once per domain (the roll-ups cannot know it is the same message).
        return Viewer(user, role, domains)
    return Viewer(user, role, None)
