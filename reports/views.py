"""The pages: dashboard, message log and detail, reports, audit log.

Every query of messages goes through `message_for` or `Viewer.messages()`, both of which are
`Message.objects.visible_to(user)`: a message outside one's scope is a 404 wherever it is asked for.
"""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import urlencode

from django import forms
from django.contrib import messages as flash
from django.contrib.auth.decorators import login_required
from django.db import IntegrityError
from django.db.models import BinaryField, Prefetch, Q, prefetch_related_objects
from django.db.models.functions import Length, Substr
from django.http import Http404, HttpResponse, HttpResponseRedirect, QueryDict
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from django.views.decorators.clickjacking import xframe_options_sameorigin
from django.views.decorators.http import require_GET, require_POST

from console.http import client_ip
from gateway.access import may_release_virus, recipients_in_scope
from gateway.mailqueue.listing import failing_routes
from gateway.models import AuditEvent, Message, RawMessage, Recipient, Verdict, record_audit

from . import exports, mailparse, stats
from .filters import MessageFilterForm, apply_filters, log_page
from .models import DailyTop, SavedFilter
from .rollup import day_bounds
from .scope import can_download, is_admin, viewer_for

# The preview's own policy: nothing may load or run but inline styles and inline images, and the document
# is sandboxed even if opened outside its frame.
PREVIEW_CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; font-src 'none'; "
               "form-action 'none'; base-uri 'none'; frame-ancestors 'self'; sandbox")
CHART_VERDICTS = [("clean", "Clean"), ("spam", "Spam"), ("high_spam", "High spam"), ("virus", "Virus"),
                  ("blocked_attachment", "Blocked attachment"), ("blocked_sender", "Blocked sender"),
                  ("refused", "Refused at SMTP")]
PAGING_PARAMS = ("after", "before")


def message_for(user, queue_id: str) -> Message:
    """The message with this queue id if this user may see it; 404 otherwise (also when it does not exist)."""
    return get_object_or_404(Message.objects.visible_to(user), queue_id=queue_id)


def _series(rows: list[dict], label_key: str, label_format: str) -> dict:
    return {
        "labels": [row[label_key].strftime(label_format) for row in rows],
        "series": [{"key": key, "label": label, "data": [row[key] for row in rows]} for key, label in CHART_VERDICTS],
    }


# --- Dashboard -----------------------------------------------------------------------------------------------

@login_required
@require_GET
def dashboard(request):
    viewer = viewer_for(request.user)
    today = stats.Period.last_days(1)
    month = stats.Period.last_days(30)
    stats.warm(viewer, month)
    hourly = stats.traffic_by_hour(viewer, 24)
    daily = stats.traffic_by_day(viewer, month)
    scores = stats.score_distribution(viewer, month)
    latest = log_page(request.user, {}, "-received", limit=10).items
    prefetch_related_objects(latest, "recipients")
    charts = {
        "hourly": _series(hourly, "hour", "%H:00"),
        "daily": _series(daily, "day", "%d %b"),
        "scores": {"labels": [s["label"] for s in scores], "data": [s["count"] for s in scores]},
    }
    context = {
        "totals": stats.today_totals(viewer),
        "refusals": stats.refusals(viewer, today),
        "top_senders": stats.top(viewer, "sender", today),
        "top_senders_volume": stats.top(viewer, "sender", today, order="volume"),
        "latest": latest,
        "charts": charts,
        "viewer": viewer,
        # Routes whose last ROUTE_FAILING_AFTER deliveries all failed: administrators see every route.
        "failing_routes": failing_routes() if viewer.role == "admin" else [],
    }
    return render(request, "reports/dashboard.html", context)


# --- Message log ---------------------------------------------------------------------------------------------

def _filter_query(params: QueryDict) -> str:
    """The query string of the filters alone (no paging), for saved filters and export links."""
    kept = params.copy()
    for name in PAGING_PARAMS:
        kept.pop(name, None)
    return kept.urlencode()


@login_required
@require_GET
def message_log(request):
    form = MessageFilterForm(request.GET or None)
    data = (form.cleaned_data if form.is_valid() else None) if form.is_bound else {}
    sort = form.sort_key if form.is_bound else "-received"
    page = log_page(request.user, data, sort, after=request.GET.get("after"), before=request.GET.get("before"))
    prefetch_related_objects(page.items, Prefetch("recipients", queryset=Recipient.objects.order_by("id")))
    query = _filter_query(request.GET)
    return render(request, "reports/message_log.html", {
        "form": form, "page": page, "filter_query": query,
        "saved_filters": SavedFilter.objects.filter(user=request.user),
        # States that go without saying next to the verdict; any other (deferred, bounced…) is shown.
        "usual_states": ("delivered", "quarantined", "refused", "deleted"),
        "next_query": _with(request.GET, after=page.next_cursor) if page.next_cursor else "",
        "prev_query": _with(request.GET, before=page.prev_cursor) if page.prev_cursor else "",
    })


def _with(params: QueryDict, **changes) -> str:
    kept = params.copy()
    for name in PAGING_PARAMS:
        kept.pop(name, None)
    for name, value in changes.items():
        if value:
            kept[name] = value
    return kept.urlencode()


@login_required
@require_GET
def message_export(request):
    """CSV of everything the filter shows, streamed: an export of a million rows does not sit in memory."""
    form = MessageFilterForm(request.GET or None)
    qs = Message.objects.visible_to(request.user)
    if form.is_bound:
        if not form.is_valid():
            raise Http404("invalid filter")
        qs = apply_filters(qs, form.cleaned_data)
    record_audit("export_messages", user=request.user, ip=client_ip(request), target=_filter_query(request.GET))
    return exports.stream_messages(qs, form.sort_key if form.is_bound else "-received")


class SavedFilterForm(forms.Form):
    name = forms.CharField(max_length=100)
    query = forms.CharField(max_length=2000, required=False)


@login_required
@require_POST
def saved_filter_create(request):
    form = SavedFilterForm(request.POST)
    if not form.is_valid():
        flash.error(request, "A saved filter needs a name.")
        return redirect("message_log")
    # Keep only what the filter form knows: a saved filter is a query string we build links from.
    query = QueryDict(form.cleaned_data["query"])
    known = {name: query.getlist(name) for name in MessageFilterForm.base_fields if query.get(name)}
    query_string = urlencode(known, doseq=True)
    try:
        SavedFilter.objects.update_or_create(user=request.user, name=form.cleaned_data["name"].strip(),
                                             defaults={"query": query_string})
    except IntegrityError:
        flash.error(request, "That filter could not be saved.")
    else:
        flash.success(request, f"Filter “{form.cleaned_data['name']}” saved.")
    return HttpResponseRedirect(f"{reverse('message_log')}?{query_string}")


@login_required
@require_POST
def saved_filter_delete(request, pk: int):
    saved = get_object_or_404(SavedFilter, pk=pk, user=request.user)
    saved.delete()
    flash.success(request, f"Filter “{saved.name}” deleted.")
    return redirect("message_log")


# --- Message detail --------------------------------------------------------------------------------------

def _quarantine_actions(message: Message, user, *, has_raw: bool) -> list[dict]:
    """The quarantine actions this user may take on this message, as the quarantine itself decides them
    (gateway.access): release and delete for the held recipients they act for (a virus is released by
    administrators), learning for a recipient's message. None for a message they see only as its sender."""
    held = recipients_in_scope(message.recipients.filter(status=Recipient.Status.QUARANTINED), user).exists()
    recipient = held or recipients_in_scope(message.recipients.all(), user).exists()
    choices = []
    if held and (message.verdict != Verdict.VIRUS or may_release_virus(user)):
        choices.append(("release", "Release", {}))
    if recipient and has_raw:
        choices += [("learn", "Learn as spam", {"as": "spam"}), ("learn", "Learn as ham", {"as": "ham"})]
    if held:
        choices.append(("delete", "Delete", {}))
    return [{"name": name, "label": label, "url": reverse(f"quarantine:{name}", args=[message.queue_id]),
             "extra": extra} for name, label, extra in choices]


def _raw_bytes(message: Message) -> bytes | None:
    data = RawMessage.objects.filter(message=message).values_list("data", flat=True).first()
    return bytes(data) if data is not None else None


def _raw_head(message: Message) -> tuple[bytes | None, int]:
    """The first mailparse.MAX_PARSE_BYTES of the stored original (what the pages read of it), and its whole
    size: a 25 MB message costs the page what a 1 MB one does."""
    row = (RawMessage.objects.filter(message=message)
           .annotate(head=Substr("data", 1, mailparse.MAX_PARSE_BYTES, output_field=BinaryField()),
                     stored=Length("data"))
           .values_list("head", "stored").first())
    if row is None or row[0] is None:
        return None, 0
    return bytes(row[0]), int(row[1] or 0)


@login_required
@require_GET
def message_detail(request, queue_id: str):
    message = message_for(request.user, queue_id)
    raw, size = _raw_head(message)
    parsed = mailparse.parse(raw, size=size)
    rules = sorted((r for r in message.spam_rules if isinstance(r, dict)) if isinstance(message.spam_rules, list)
                   else [], key=lambda r: -(r.get("score") or 0) if isinstance(r.get("score"), (int, float)) else 0)
    is_quarantined = message.quarantined or message.state == Message.State.QUARANTINED
    return render(request, "reports/message_detail.html", {
        "message": message,
        "recipients": message.recipients.order_by("id"),
        "parsed": parsed,
        "has_raw": raw is not None,
        "rules": rules,
        "attachments": [a for a in message.attachments if isinstance(a, dict)]
        if isinstance(message.attachments, list) else [],
        "checks": mailparse.checks_summary(message.checks),
        "audit_events": message.audit_events.order_by("-at", "-id")[:100],
        "is_quarantined": is_quarantined,
        "show_preview": raw is not None and is_quarantined,
        "can_download": can_download(request.user) and raw is not None,
        "actions": _quarantine_actions(message, request.user, has_raw=raw is not None)
        if message.state == Message.State.QUARANTINED else [],
    })


@login_required
@require_GET
def message_download(request, queue_id: str):
    if not can_download(request.user):
        raise Http404("not available")
    message = message_for(request.user, queue_id)
    raw = _raw_bytes(message)
    if raw is None:
        raise Http404("original not stored")
    record_audit("download", user=request.user, ip=client_ip(request), message=message)
    response = HttpResponse(raw, content_type="message/rfc822")
    response["Content-Disposition"] = f'attachment; filename="{message.queue_id}.eml"'
    return response


@xframe_options_sameorigin
@login_required
@require_GET
def message_preview(request, queue_id: str):
    return preview_response(request, message_for(request.user, queue_id))


def preview_response(request, message: Message) -> HttpResponse:
    """The sanitised preview of a message the caller was allowed to see (here, or through a digest's link):
    no scripts, no remote content, a sandbox of its own (PREVIEW_CSP), framed by our pages only."""
    raw, size = _raw_head(message)
    if raw is None:
        raise Http404("original not stored")
    parsed = mailparse.parse(raw, size=size)
    html = mailparse.sanitize_html(parsed.html) if parsed.html else None
    response = render(request, "reports/preview.html", {"html": html, "text": parsed.text, "parsed": parsed})
    response["Content-Security-Policy"] = PREVIEW_CSP
    response["Cache-Control"] = "private, no-store"
    return response


# --- Reports ---------------------------------------------------------------------------------------------

class PeriodForm(forms.Form):
    date_from = forms.DateField(required=False, label="From", widget=forms.DateInput(attrs={"type": "date"}))
    date_to = forms.DateField(required=False, label="To", widget=forms.DateInput(attrs={"type": "date"}))

    MAX_DAYS = 3660

    def period(self) -> stats.Period:
        today = timezone.localdate()
        data = self.cleaned_data if self.is_valid() else {}
        end = data.get("date_to") or today
        start = data.get("date_from") or end - timedelta(days=29)
        if start > end:
            start, end = end, start
        start = max(start, end - timedelta(days=self.MAX_DAYS))
        return stats.Period(start, end)


TOP_REPORTS = {
    "top-senders": ("sender", "Top senders", "Sender"),
    "top-recipients": ("recipient", "Top recipients", "Recipient"),
    "top-sender-domains": ("sender_domain", "Top sender domains", "Sender domain"),
    "top-recipient-domains": ("recipient_domain", "Top recipient domains", "Recipient domain"),
}
REPORTS = {
    "total-by-date": ("Total mail by date", "Mail, viruses, spam, blocked content, volume and refusals per day"),
    **{slug: (title, "The 25 busiest, by number of messages and by volume") for slug, (_, title, _) in
       TOP_REPORTS.items()},
    "viruses": ("Top viruses", "The viruses found, by number of messages"),
    "rules": ("SpamAssassin rule hits", "Which rules matched, how often, with their scores"),
    "score-distribution": ("Spam score distribution", "Messages per whole spam score"),
    "hourly": ("Messages per hour", "Mail per hour of the day over the period"),
}
TOP_LIMIT = 25


@login_required
@require_GET
def reports_index(request):
    return render(request, "reports/index.html", {"reports": [
        {"slug": slug, "title": title, "description": text} for slug, (title, text) in REPORTS.items()]})


@login_required
@require_GET
def report(request, slug: str):
    if slug not in REPORTS:
        raise Http404("no such report")
    form = PeriodForm(request.GET or None)
    period = form.period()
    viewer = viewer_for(request.user)
    stats.warm(viewer, period, details=slug in ("top-recipients", "top-recipient-domains", "viruses", "rules"))
    title = REPORTS[slug][0]
    shown_form = form if form.is_bound else PeriodForm(initial={"date_from": period.start, "date_to": period.end})
    context: dict = {"form": shown_form, "period": period, "slug": slug, "title": title, "chart": None}
    if slug == "total-by-date":
        rows, total = stats.total_mail_by_date(viewer, period)
        context.update(rows=rows, total=total)
        csv_rows = exports.total_by_date_rows(rows, total)
    elif slug in TOP_REPORTS:
        kind, _, key_label = TOP_REPORTS[slug]
        by_count = stats.top(viewer, kind, period, limit=TOP_LIMIT)
        by_volume = stats.top(viewer, kind, period, order="volume", limit=TOP_LIMIT)
        context.update(by_count=by_count, by_volume=by_volume, key_label=key_label)
        csv_rows = exports.top_rows(key_label, by_count, by_volume)
    elif slug == "viruses":
        rows = stats.top(viewer, DailyTop.Kind.VIRUS, period, limit=100)
        context.update(rows=rows)
        csv_rows = [["Virus", "Messages"], *[[r["key"], r["count"]] for r in rows]]
    elif slug == "rules":
        rows = stats.top(viewer, DailyTop.Kind.RULE, period, limit=200)
        context.update(rows=rows)
        csv_rows = [["Rule", "Description", "Hits", "Average score"],
                    *[[r["key"], r["description"], r["count"], r["avg_score"]] for r in rows]]
    elif slug == "score-distribution":
        rows = stats.score_distribution(viewer, period)
        context.update(rows=rows, chart={"type": "bar", "labels": [r["label"] for r in rows],
                                         "series": [{"key": "spam", "label": "Messages",
                                                     "data": [r["count"] for r in rows]}]})
        csv_rows = [["Score", "Messages"], *[[r["label"], r["count"]] for r in rows]]
    else:  # hourly
        rows = stats.traffic_by_hour_of_day(viewer, period)
        for row in rows:
            row["spam_total"] = row["spam"] + row["high_spam"]
        context.update(rows=rows, chart={"type": "stacked", "labels": [f"{r['hour']:02d}:00" for r in rows],
                                         "series": [{"key": key, "label": label, "data": [r[key] for r in rows]}
                                                    for key, label in CHART_VERDICTS]})
        csv_rows = [["Hour", "Mail", "Clean", "Spam", "Virus", "Blocked attachment", "Refused", "Volume (bytes)"],
                    *[[f"{r['hour']:02d}:00", r["messages"], r["clean"], r["spam_total"], r["virus"],
                       r["blocked_attachment"], r["refused"], r["volume"]] for r in rows]]
    if request.GET.get("format") == "csv":
        return exports.csv_response(csv_rows, f"{slug}-{period.start}-{period.end}.csv")
    context["csv_query"] = _with(request.GET, format="csv")
    template = "report_top" if slug in TOP_REPORTS else f"report_{slug.replace('-', '_')}"
    return render(request, f"reports/{template}.html", context)


# --- Audit log -------------------------------------------------------------------------------------------

class AuditFilterForm(forms.Form):
    date_from = forms.DateField(required=False, label="From", widget=forms.DateInput(attrs={"type": "date"}))
    date_to = forms.DateField(required=False, label="To", widget=forms.DateInput(attrs={"type": "date"}))
    username = forms.CharField(required=False, max_length=150, label="User")
    action = forms.CharField(required=False, max_length=50)
    target = forms.CharField(required=False, max_length=200, help_text="Queue id, address…")
    ip = forms.GenericIPAddressField(required=False, label="IP")


AUDIT_PAGE_SIZE = 100


@login_required
@require_GET
def audit_log(request):
    if not is_admin(request.user):
        raise Http404("administrators only")
    form = AuditFilterForm(request.GET or None)
    qs = AuditEvent.objects.select_related("message")
    if form.is_bound and form.is_valid():
        data = form.cleaned_data
        if data["date_from"]:
            qs = qs.filter(at__gte=day_bounds(data["date_from"])[0])
        if data["date_to"]:
            qs = qs.filter(at__lt=day_bounds(data["date_to"])[1])
        if data["username"]:
            qs = qs.filter(username__iexact=data["username"])
        if data["action"]:
            qs = qs.filter(action=data["action"])
        if data["target"]:
            qs = qs.filter(target__icontains=data["target"])
        if data["ip"]:
            qs = qs.filter(ip=data["ip"])
    # Keyset on (at, id), newest first, as the message log.
    after = request.GET.get("after", "")
    at_text, _, id_text = after.partition("_")
    at = parse_datetime(at_text) if at_text else None
    if at and id_text.isdigit():
        qs = qs.filter(Q(at__lt=at) | Q(at=at, id__lt=int(id_text)))
    events = list(qs.order_by("-at", "-id")[:AUDIT_PAGE_SIZE + 1])
    next_query = ""
    if len(events) > AUDIT_PAGE_SIZE:
        events = events[:AUDIT_PAGE_SIZE]
        last = events[-1]
        next_query = _with(request.GET, after=f"{last.at.isoformat()}_{last.pk}")
    actions = sorted(AuditEvent.objects.order_by().values_list("action", flat=True).distinct()[:200])
    return render(request, "reports/audit_log.html", {
        "form": form, "events": events, "next_query": next_query, "actions": actions,
        "first_query": _with(request.GET) if after else "",
    })
