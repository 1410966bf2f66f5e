"""The pages for running the appliance: the mail queue (/queue/), the status page (/status/), and the machine
endpoints /healthz and /metrics.

The queue is for administrators and, for the recipients of their domains, domain administrators: what they
see and act on is gateway.mailqueue.listing.queued(user), built on gateway.access. Everyone else gets a 403.
"""

from __future__ import annotations

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import Q
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST

from gateway.access import Role, role_of
from gateway.mailqueue import actions
from gateway.mailqueue.listing import (
    Destinations,
    QueueState,
    by_destination,
    by_reply,
    in_reply_group,
    may_see_queue,
    queued,
    state_counts,
)

from . import health, metrics
from .http import client_ip

PAGE_SIZE = 100


class QueueFilterForm(forms.Form):
    state = forms.ChoiceField(required=False, choices=[("", "any")] + list(QueueState.LABELS.items()))
    route = forms.CharField(required=False, label="Destination", help_text="a route's name or host")
    node = forms.CharField(required=False)
    sender = forms.CharField(required=False)
    recipient = forms.CharField(required=False)
    reply = forms.CharField(required=False, label="Last reply contains")


def _filtered(request: HttpRequest, destinations: Destinations):
    """The queue this login may act for, narrowed by the filter of the request (GET or the action's POST)."""
    form = QueueFilterForm(request.GET if request.method == "GET" else request.POST)
    recipients = queued(request.user)
    if form.is_valid():
        data = form.cleaned_data
        if data["state"]:
            recipients = recipients.filter(queue_state=data["state"])
        if data["route"]:
            recipients = destinations.filter(recipients, data["route"])
        if data["node"]:
            recipients = recipients.filter(message__node=data["node"].strip())
        if data["sender"]:
            recipients = recipients.filter(message__envelope_sender__icontains=data["sender"].strip())
        if data["recipient"]:
            recipients = recipients.filter(address__icontains=data["recipient"].strip())
        if data["reply"]:
            text = data["reply"].strip()
            recipients = recipients.filter(Q(reply_text__icontains=text) | Q(message__last_error__icontains=text))
    return form, recipients


def _require_queue(request: HttpRequest) -> None:
    if not may_see_queue(request.user):
        raise PermissionDenied("The mail queue is for administrators and domain administrators")


@login_required
@require_GET
def queue(request: HttpRequest) -> HttpResponse:
    _require_queue(request)
    destinations = Destinations.read()
    form, recipients = _filtered(request, destinations)
    page = Paginator(recipients.select_related("message").order_by("message__received_at", "id"),
                     PAGE_SIZE).get_page(request.GET.get("page"))
    for recipient in page:
        recipient.destination = destinations.of(recipient.domain)
        recipient.state_label = QueueState.LABELS.get(recipient.queue_state, recipient.queue_state)
        recipient.next_at = (recipient.message.next_attempt_at if recipient.queue_state == QueueState.SCAN_DEFERRED
                             else recipient.next_attempt_at)
    filter_items = [(name, value) for name, value in request.GET.items() if name != "page" and value]
    return render(request, "console/queue.html", {
        "form": form, "page": page, "total": page.paginator.count,
        "counts": [(QueueState.LABELS[state], state, n) for state, n in state_counts(queued(request.user)).items()],
        "destinations": by_destination(recipients, destinations), "replies": by_reply(recipients),
        "filtered": bool(filter_items), "filter_items": filter_items, "actions": actions.ACTIONS,
        "is_admin": role_of(request.user) == Role.ADMIN,
    })


@login_required
@require_POST
def queue_act(request: HttpRequest) -> HttpResponse:
    """One action on the ticked recipients, on a group (`group=destination|reply`, `key=...`), or on everything
    that matches the filter; always within what this login may act for."""
    _require_queue(request)
    action = request.POST.get("action", "")
    if action not in actions.ACTIONS:
        messages.error(request, "Choose an action.")
        return _back(request)
    destinations = Destinations.read()
    _, recipients = _filtered(request, destinations)
    target = request.POST.get("target", "selected")
    if target == "selected":
        try:
            ids = [int(value) for value in request.POST.getlist("ids")]
        except ValueError:
            messages.error(request, "The selection is not valid.")
            return _back(request)
        if not ids:
            messages.error(request, "Tick at least one recipient, or choose a group.")
            return _back(request)
        recipients = recipients.filter(pk__in=ids)
    elif target == "destination":
        recipients = destinations.filter(recipients, request.POST.get("key", ""))
    elif target == "reply":
        recipients = in_reply_group(recipients, request.POST.get("key", ""))
    elif target != "all":
        messages.error(request, "Unknown target.")
        return _back(request)
    outcome = actions.act(action, recipients, by=request.user, ip=client_ip(request))
    (messages.success if outcome.done else messages.warning)(request, outcome.summary().capitalize() + ".")
    return _back(request)


def _back(request: HttpRequest) -> HttpResponse:
    query = request.POST.get("back", "")
    url = reverse("queue")
    return redirect(f"{url}?{query}" if query and not query.startswith(("/", "http")) else url)


@login_required
@require_GET
@never_cache
def status(request: HttpRequest) -> HttpResponse:
    if role_of(request.user) != Role.ADMIN:
        raise PermissionDenied("The status page is for administrators")
    components = health.components()
    nodes = health.nodes()
    return render(request, "console/status.html", {
        "components": components, "nodes": nodes, "errors": health.last_errors(),
        "worst": _worst([c.level for c in components] + [n.level for n in nodes] + ([] if nodes else [health.AMBER])),
    })


def _worst(levels: list[str]) -> str:
    for level in (health.RED, health.AMBER):
        if level in levels:
            return level
    return health.GREEN


@require_GET
@never_cache
def healthz(request: HttpRequest) -> JsonResponse:
    """For load balancers and container health checks: no login, and nothing but whether each part answers."""
    ok, checks = health.health()
    return JsonResponse({"status": "ok" if ok else "fail", "checks": checks}, status=200 if ok else 503)


@require_GET
@never_cache
def metrics_view(request: HttpRequest) -> HttpResponse:
    if not metrics.allowed(client_ip(request), request.headers.get("Authorization", "")):
        return HttpResponse("403 Forbidden: a token or an allowed address is needed (METRICS_TOKEN, METRICS_ALLOW)\n",
                            status=403, content_type="text/plain")
    from prometheus_client import CONTENT_TYPE_LATEST

    return HttpResponse(metrics.exposition(), content_type=CONTENT_TYPE_LATEST)
