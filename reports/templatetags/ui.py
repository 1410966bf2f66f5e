"""Small template helpers of the UI: the viewer's role for the navigation, verdict badges, optional URLs."""

from __future__ import annotations

from django import template
from django.urls import NoReverseMatch, reverse
from django.utils.html import format_html

from gateway.access import role_of

register = template.Library()

SHORT_STATES = {"received": "waiting", "scanning": "scanning", "scan_deferred": "scan deferred",
                "delivering": "delivering", "delivered": "delivered", "partial": "partly delivered",
                "bounced": "bounced", "quarantined": "quarantined", "released": "released", "deleted": "deleted",
                "refused": "refused"}
BADGE_CLASSES = {"clean": "clean", "spam": "spam", "high_spam": "high-spam", "virus": "virus",
                 "blocked_attachment": "blocked", "blocked_sender": "blocked-sender"}


@register.simple_tag(takes_context=True)
def ui_role(context) -> str:
    request = context.get("request")
    return role_of(request.user) if request is not None else ""


@register.simple_tag
def optional_url(*names: str) -> str:
    """The first of these URL names that resolves, or "": links to apps that may not be installed."""
    for name in names:
        try:
            return reverse(name)
        except NoReverseMatch:
            continue
    return ""


@register.simple_tag
def verdict_badge(message) -> str:
    """One badge that says what happened to a message: its verdict, or why it was refused, or its wait."""
    if message.state == "refused":
        reason = message.get_refusal_reason_display() if message.refusal_reason else "Refused"
        return format_html('<span class="badge badge-refused" title="Refused at SMTP time">{}</span>', reason)
    if not message.verdict:
        return format_html('<span class="badge badge-pending" title="{}">{}</span>', message.get_state_display(),
                           short_state(message.state))
    return format_html('<span class="badge badge-{}">{}</span>', BADGE_CLASSES.get(message.verdict, "other"),
                       message.get_verdict_display())


@register.filter
def score(value) -> str:
    return "" if value is None else f"{value:.1f}"


@register.filter
def short_state(state: str) -> str:
    """A message state in a word or two, for badges (the full label goes in their title)."""
    return SHORT_STATES.get(state, state.replace("_", " "))
