"""The read-only JSON API: messages (filtered, keyset-paged), one message, daily statistics.

Authentication: the browser session, or `Authorization: Token <key>` (see `manage.py api_token`). A wrong token
counts as a failed login of the client's IP in the login throttle every door shares (gateway.throttle): an
address over its limit is answered 429 without its token being looked at. The scoping is the pages' own:
`Message.objects.visible_to`, so a message outside one's scope is a 404 here too. Documented in docs/api.md.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from functools import wraps

from django.db.models import prefetch_related_objects
from django.http import Http404, JsonResponse
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_GET

from console.http import client_ip
from gateway import throttle
from gateway.access import Role
from gateway.models import Message, Recipient

from . import stats
from .filters import MessageFilterForm, log_page
from .models import ApiToken
from .scope import viewer_for
from .views import PeriodForm, message_for

MAX_LIMIT = 500
MAX_STATS_DAYS = 366


def api_auth(view: Callable) -> Callable:
    """Session or token; an API answers 401 in JSON rather than redirecting to the login page."""

    @wraps(view)
    def wrapper(request, *args, **kwargs):
        header = request.META.get("HTTP_AUTHORIZATION", "")
        if header:
            ip = client_ip(request)
            if throttle.refusal(None, ip):
                response = _error(429, "too many failed authentications from this address; try again later")
                response["Retry-After"] = str(throttle.window_seconds())
                return response
            scheme, _, key = header.partition(" ")
            user = ApiToken.authenticate(key) if scheme.lower() == "token" and key.strip() else None
            if user is None:
                throttle.record_failure(None, ip)
                return _error(401, "invalid token")
            request.user = user
        elif not request.user.is_authenticated:
            response = _error(401, "authentication required: log in, or send 'Authorization: Token <key>'")
            response["WWW-Authenticate"] = "Token"
            return response
        response = view(request, *args, **kwargs)
        response["Cache-Control"] = "private, no-store"
        return response

    return wrapper


def _error(status: int, text: str) -> JsonResponse:
    return JsonResponse({"error": text}, status=status)


def _iso(value) -> str | None:
    # In the appliance's time zone (TIME_ZONE), with its offset: the pages show the same wall-clock times.
    return timezone.localtime(value).isoformat() if value else None


def message_summary(m: Message, request) -> dict:
    return {
        "queue_id": m.queue_id,
        "received_at": _iso(m.received_at),
        "direction": m.direction,
        "state": m.state,
        "client_ip": m.client_ip,
        "client_name": m.client_name,
        "sender": m.envelope_sender,
        "recipients": [r.address for r in m.recipients.all()],
        "header_from": m.header_from,
        "subject": m.subject,
        "size": m.size,
        "verdict": m.verdict,
        "action": m.action,
        "quarantined": m.quarantined,
        "spam_score": m.spam_score,
        "virus_names": m.virus_names,
        "refusal_reason": m.refusal_reason,
        "url": request.build_absolute_uri(reverse("message_detail", args=[m.queue_id])),
    }


@require_GET
@api_auth
def messages(request):
    form = MessageFilterForm(request.GET)
    if not form.is_valid():
        return JsonResponse({"error": "invalid filter", "fields": form.errors.get_json_data()}, status=400)
    try:
        limit = max(1, min(MAX_LIMIT, int(request.GET.get("limit", 50))))
    except ValueError:
        return _error(400, "limit must be a number")
    page = log_page(request.user, form.cleaned_data, form.sort_key, after=request.GET.get("after"),
                    before=request.GET.get("before"), limit=limit)
    prefetch_related_objects(page.items, "recipients")
    base = request.GET.copy()
    for name in ("after", "before"):
        base.pop(name, None)

    def link(**cursor) -> str:
        params = base.copy()
        params.update(cursor)
        return request.build_absolute_uri(f"{reverse('api_messages')}?{params.urlencode()}")

    return JsonResponse({
        "results": [message_summary(m, request) for m in page.items],
        "next": link(after=page.next_cursor) if page.next_cursor else None,
        "previous": link(before=page.prev_cursor) if page.prev_cursor else None,
    })


@require_GET
@api_auth
def message(request, queue_id: str):
    try:
        m = message_for(request.user, queue_id)
    except Http404:
        return _error(404, "no such message")
    data = message_summary(m, request)
    data.update({
        "helo": m.helo,
        "message_id": m.message_id,
        "spam_threshold": m.spam_threshold,
        "spam_rules": m.spam_rules,
        "attachments": m.attachments,
        "checks": m.checks,
        "scan_notes": m.scan_notes,
        "smtp_reply": m.smtp_reply,
        "scanned_at": _iso(m.scanned_at),
        "completed_at": _iso(m.completed_at),
        "recipients": [{
            "address": r.address, "status": r.status, "verdict": r.verdict, "action": r.action,
            "policy": r.policy, "released": r.released, "reply_code": r.reply_code, "reply_text": r.reply_text,
            "delivered_at": _iso(r.delivered_at),
        } for r in Recipient.objects.filter(message=m).order_by("id")],
    })
    return JsonResponse(data)


@require_GET
@api_auth
def stats_daily(request):
    form = PeriodForm(request.GET)
    if request.GET and not form.is_valid():
        return JsonResponse({"error": "invalid dates", "fields": form.errors.get_json_data()}, status=400)
    period = form.period()
    if (period.end - period.start).days >= MAX_STATS_DAYS:
        period = stats.Period(period.end - timedelta(days=MAX_STATS_DAYS - 1), period.end)
    viewer = viewer_for(request.user)
    rows = stats.traffic_by_day(viewer, period)
    if viewer.role == Role.ADMIN:
        scope = "all"
    elif viewer.uses_rollups:
        scope = list(viewer.scopes)
    else:
        scope = "own"
    return JsonResponse({
        "from": period.start.isoformat(),
        "to": period.end.isoformat(),
        "timezone": timezone.get_current_timezone_name(),
        "scope": scope,
        "days": [{"date": row.pop("day").isoformat(), **row} for row in rows],
    })
