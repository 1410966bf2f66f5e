"""Who is looking: the viewer's role, and which roll-up rows answer for them.

Which *messages* a user may see is decided in one place only, `Message.objects.visible_to` (gateway). This
module maps the same roles onto roll-up rows: an administrator reads the "*" rows (all mail), a domain
administrator the rows of their domains, and a user the rows of their addresses (`AddressStat`), with what
those do not hold read from their own messages through `visible_to`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.access import Role, address_domain, addresses_of, domains_of, may_download, role_of
from gateway.models import Domain, Message

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
    # A user's addresses when each is at a protected domain: their numbers are kept per address
    # (AddressStat); None: none are kept, and a user's numbers come from their messages.
    addresses: tuple[str, ...] | None = None
    # What rows do not hold is computed from the viewer's messages once per window and request (reports.stats).
    live: list = field(default_factory=list, compare=False, repr=False)

    @property
    def uses_rollups(self) -> bool:
        return self.scopes is not None

    @property
    def uses_address_rollups(self) -> bool:
        return self.addresses is not None

    def messages(self, received: tuple | None = None):
        return Message.objects.visible_to(self.user, received=received)


def viewer_for(user) -> Viewer:
    role = role_of(user)
    if role == Role.ADMIN:
        return Viewer(user, role, (ALL_SCOPE,))
    if role == Role.DOMAIN_ADMIN:
        domains = tuple(sorted(domains_of(user)))
        # A domain administrator of several domains sums their rows: a message between two of their own
        # domains is counted once per domain (the roll-ups cannot know it is the same message).
        return Viewer(user, role, domains)
    addresses = tuple(addresses_of(user))
    protected = set(Domain.objects.filter(name__in={address_domain(a) for a in addresses})
                    .values_list("name", flat=True))
    # The roll-up keeps the addresses of protected domains only; a user with another sees their own log added up.
    kept = addresses if addresses and all(address_domain(a) in protected for a in addresses) else None
    return Viewer(user, role, None, kept)
