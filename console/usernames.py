"""What a login name may be: ASCII letters, digits and . _ - +, nothing else.

A login name is not an address: one with an '@' ("bob@b.test") reads as somebody's mailbox in the audit log,
in `authenticated_as` and at SMTP AUTH (which takes an e-mail address as a login too). And a name in another
script can look like an existing one ("аlice" with a Cyrillic а, "ａｌｉｃｅ" in full-width letters): rather than
judge which scripts mix, only ASCII is taken, where every character has one look. Names are unique whatever
their case ("Alice" is "alice"). Django's own UnicodeUsernameValidator allows '@' and all of Unicode, so it is
not used alone.
"""

from __future__ import annotations

import re

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError

ALLOWED = re.compile(r"[A-Za-z0-9._+-]+")
HELP_TEXT = "Letters a–z, digits and . _ - + (no @: a login name is not an address); 150 at most"


def validate_username(value: str) -> None:
    """Refuse a login name that is not plain ASCII letters, digits and . _ - +, saying what is wrong."""
    if not value:
        raise ValidationError("Enter a login name.", code="required")
    if len(value) > 150:
        raise ValidationError("A login name has 150 characters at most.", code="max_length")
    if "@" in value:
        raise ValidationError("A login name cannot contain @: it is not an e-mail address (put the address in "
                              "the e-mail field).", code="at_sign")
    if not ALLOWED.fullmatch(value):
        others = sorted({c for c in value if not ALLOWED.fullmatch(c)})
        shown = ", ".join(repr(c) if c.isprintable() and not c.isspace() else f"U+{ord(c):04X}" for c in others)
        raise ValidationError(f"A login name may hold only the letters a–z, digits and . _ - + (not {shown}): "
                              "look-alike letters of other scripts would pass for another login.", code="invalid")


def username_taken(value: str, *, exclude_pk=None) -> bool:
    """Whether another login has this name, whatever its case."""
    clash = get_user_model().objects.filter(username__iexact=value)
    if exclude_pk is not None:
        clash = clash.exclude(pk=exclude_pk)
    return clash.exists()
