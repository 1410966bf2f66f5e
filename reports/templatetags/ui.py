"""Small template helpers of the UI: the viewer's role for the navigation, verdict badges, optional URLs."""

from __future__ import annotations

from django import template
from django.urls import NoReverseMatch, reverse
from django.utils.html import format_html

from reports.scope import role_of

register = template.Library()

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
        return format_html('<span class="badge badge-pending">{}</span>', message.get_state_display())
    return format_html('<span class="badge badge-{}">{}</span>', BADGE_CLASSES.get(message.verdict, "other"),
                       message.get_verdict_display())


@register.filter
def score(value) -> str:
    return "" if value is None else f"{value:.1f}"
