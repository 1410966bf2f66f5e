"""The quarantine pages: the list in one's scope, one message's options, the actions, bulk jobs, the lists.

Every message is fetched through `_get_message_for` (and lists through `quarantine_of`), both built on
`Message.objects.visible_to`: what is outside one's scope does not exist here, it is a 404. A message one sees
but does not act for (one sees it as its sender: no held recipient of it is one's own) is shown, and its
actions answer 403 with the reason; the buttons are not offered. The actions themselves are
quarantine.actions' functions, which check the same again; these views only check who asks and say what
happened.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.paginator import Paginator
from django.db.models import F, Prefetch, QuerySet, prefetch_related_objects
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBadRequest, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme, urlencode
from django.views.decorators.http import require_http_methods, require_POST

from console.http import client_ip
from gateway.access import Role, role_of
from gateway.models import Message, Recipient, SenderListEntry, keyset_rows, record_audit

from . import actions
from .bulk import advance_if_due, start_bulk_job
from .forms import BulkForm, ListEntryForm, QuarantineFilterForm, ReleaseForm, SenderFromMessageForm
from .models import BulkJob
from .selection import acts_for_a_recipient, held_recipients_for, list_entries_for, quarantine_of, quarantine_parts

PAGE_SIZE = 50
COUNT_LIMIT = 1_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _get_message_for(user, queue_id: str) -> Message:
    """The one way these views fetch a message: through the user's scope, or 404."""
    return get_object_or_404(Message.objects.visible_to(user), queue_id=queue_id)


def _back(request: HttpRequest, default: str) -> HttpResponse:
    """Redirect to the page the form came from when it is ours, else to `default`."""
    target = request.POST.get("next") or request.GET.get("next")
    if target and url_has_allowed_host_and_scheme(target, {request.get_host()}, request.is_secure()):
        return redirect(target)
    return redirect(default)


SENDER_ONLY = ("You see this message as its sender (or as the administrator of its sender's domain): only its "
               "recipients, and those who administer their mail, may release, delete or learn from it.")


def _refused(request: HttpRequest, message: Message, reason: str) -> HttpResponse:
    return render(request, "quarantine/refused.html", {"message": message, "reason": reason}, status=403)


def _not_held_for(request: HttpRequest, message: Message) -> HttpResponse | None:
    """None when some held copy of the message is the user's to act on; else what to answer: the message again
    with a note when their copies were acted on already (a second click), a 403 when none ever was theirs."""
    if held_recipients_for(message, request.user):
        return None
    if acts_for_a_recipient(message, request.user):
        messages.info(request, f"Message {message.queue_id}: your recipients' copies are no longer in the "
                               "quarantine (released or deleted already).")
        return redirect("quarantine:detail", queue_id=message.queue_id)
    return _refused(request, message, SENDER_ONLY)


def _not_quarantined(message: Message) -> str:
    """Why an action found nothing to do: the second click of a double click lands here."""
    message.refresh_from_db(fields=["state"])
    if message.state == Message.State.RELEASED:
        return f"Message {message.queue_id} was already released."
    if message.state == Message.State.DELETED:
        return f"Message {message.queue_id} was already deleted."
    return f"Message {message.queue_id} is not in the quarantine ({message.get_state_display().lower()})."


# --- Keyset paging -------------------------------------------------------------------------------------
# OFFSET paging reads and throws away every row before the page; a cursor on (received_at, id) reads only
# the page, however deep, so the list stays fast at any size of quarantine.


def _cursor_of(message: Message) -> str:
    return f"{(message.received_at - EPOCH) // timedelta(microseconds=1)}.{message.pk}"


def _parse_cursor(value: str | None) -> tuple[datetime, int] | None:
    try:
        micros, pk = (value or "").split(".")
        return EPOCH + timedelta(microseconds=int(micros)), int(pk)
    except ValueError:
        return None


def _keyset_page(qs: QuerySet[Message], request: HttpRequest, parts: list[QuerySet[Message]] | None = None
                 ) -> tuple[list[Message], str | None, str | None]:
    """One page of `qs` (or of its `parts`, see `quarantine_parts`), newest first, with the cursors of the
    older and the newer page (None: no such page)."""
    after, before = _parse_cursor(request.GET.get("after")), _parse_cursor(request.GET.get("before"))
    parts = parts or [qs.annotate(_sort=F("received_at"))]
    if before:
        rows = keyset_rows(parts, descending=False, beyond=before, limit=PAGE_SIZE + 1)
        has_newer = len(rows) > PAGE_SIZE
        rows = rows[:PAGE_SIZE][::-1]
        has_older = True
    else:
        rows = keyset_rows(parts, descending=True, beyond=after, limit=PAGE_SIZE + 1)
        has_older = len(rows) > PAGE_SIZE
        rows = rows[:PAGE_SIZE]
        has_newer = after is not None
    older = _cursor_of(rows[-1]) if rows and has_older else None
    newer = _cursor_of(rows[0]) if rows and has_newer else None
    return rows, older, newer


# --- The list and one message --------------------------------------------------------------------------


@login_required
def index(request: HttpRequest) -> HttpResponse:
    form = QuarantineFilterForm(request.GET or None)
    qs = quarantine_of(request.user)
    parts = quarantine_parts(request.user)
    if form.is_bound and form.is_valid():
        qs = form.apply(qs)
        parts = parts and [form.apply(part) for part in parts]
    elif form.is_bound:
        qs, parts = qs.none(), None
    rows, older, newer = _keyset_page(qs, request, parts)
    # Counted up to COUNT_LIMIT (and said "more than"): counting a quarantine of a million messages would cost
    # seconds on every page, for a figure nobody reads to the last digit.
    total = qs.order_by()[:COUNT_LIMIT + 1].count()
    prefetch_related_objects(rows, Prefetch("recipients", queryset=Recipient.objects.order_by("id")))
    filter_query = form.as_query()
    jobs = BulkJob.objects.filter(created_by=request.user, state=BulkJob.State.RUNNING)[:5]
    return render(request, "quarantine/index.html", {
        "form": form, "rows": rows, "total": total, "more_than": total > COUNT_LIMIT, "count_limit": COUNT_LIMIT,
        "filtered": bool(filter_query),
        "filter_query": urlencode(filter_query), "filter_items": filter_query.items(),
        "older": older, "newer": newer, "bulk_actions": BulkJob.Action.choices, "jobs": jobs,
        "page_size": PAGE_SIZE,
    })


def _render_detail(request: HttpRequest, message: Message, *, release_form: ReleaseForm | None = None,
                   allow_form: SenderFromMessageForm | None = None, block_form: SenderFromMessageForm | None = None,
                   status: int = 200) -> HttpResponse:
    user = request.user
    quarantined = message.state == Message.State.QUARANTINED
    mine = held_recipients_for(message, user) if quarantined else []
    allow_form = allow_form or SenderFromMessageForm(user=user, message=message, kind="allow")
    block_form = block_form or SenderFromMessageForm(user=user, message=message, kind="block")
    return render(request, "quarantine/detail.html", {
        "message": message,
        "recipients": message.recipients.order_by("id"),
        "quarantined": quarantined,
        "may_release": quarantined and bool(mine) and actions.may_release(message, user),
        "virus_refused": quarantined and not actions.may_release(message, user),
        "may_delete": quarantined and bool(mine),
        "has_raw": hasattr(message, "raw") if quarantined else False,
        "may_learn": quarantined and acts_for_a_recipient(message, user),
        "release_form": release_form or ReleaseForm(message=message, user=user),
        "sender_forms": [(allow_form, "allow", reverse("quarantine:allow_sender", args=[message.queue_id])),
                         (block_form, "block", reverse("quarantine:block_sender", args=[message.queue_id]))],
    }, status=status)


@login_required
def detail(request: HttpRequest, queue_id: str) -> HttpResponse:
    return _render_detail(request, _get_message_for(request.user, queue_id))


# --- Actions on one message ----------------------------------------------------------------------------


@login_required
@require_POST
def release(request: HttpRequest, queue_id: str) -> HttpResponse:
    message = _get_message_for(request.user, queue_id)
    if message.state != Message.State.QUARANTINED:
        messages.info(request, _not_quarantined(message))
        return redirect("quarantine:detail", queue_id=queue_id)
    refusal = _not_held_for(request, message)
    if refusal is not None:
        return refusal
    if not actions.may_release(message, request.user):
        return _refused(request, message, "Only administrators may release a message that carries a virus.")
    form = ReleaseForm(request.POST, message=message, user=request.user)
    if not form.is_valid():
        return _render_detail(request, message, release_form=form, status=400)
    try:
        released = actions.release_message(message, by=request.user, ip=client_ip(request),
                                           **form.release_arguments())
    except PermissionDenied as exc:
        return _refused(request, message, str(exc))
    except ValidationError as exc:
        form.add_error(None, exc)
        return _render_detail(request, message, release_form=form, status=400)
    if not released:
        messages.info(request, _not_quarantined(message))
        return redirect("quarantine:detail", queue_id=queue_id)
    to = form.cleaned_data.get("to_address") or ", ".join(form.cleaned_data.get("recipients") or form.allowed)
    messages.success(request, f"Message {message.queue_id} released to {to}; it is on its way.")
    return _back(request, reverse("quarantine:index"))


@login_required
@require_POST
def delete(request: HttpRequest, queue_id: str) -> HttpResponse:
    message = _get_message_for(request.user, queue_id)
    if message.state != Message.State.QUARANTINED:
        messages.info(request, _not_quarantined(message))
        return redirect("quarantine:detail", queue_id=queue_id)
    refusal = _not_held_for(request, message)
    if refusal is not None:
        return refusal
    try:
        deleted = actions.delete_message(message, by=request.user, ip=client_ip(request))
    except PermissionDenied as exc:
        return _refused(request, message, str(exc))
    if deleted:
        if message.state == Message.State.QUARANTINED:
            messages.success(request, f"Message {message.queue_id} deleted for your recipients; the other "
                                      "recipients' copies stay in the quarantine.")
        else:
            messages.success(request, f"Message {message.queue_id} deleted.")
        return _back(request, reverse("quarantine:index"))
    messages.info(request, _not_quarantined(message))
    return redirect("quarantine:detail", queue_id=queue_id)


@login_required
@require_POST
def learn(request: HttpRequest, queue_id: str) -> HttpResponse:
    message = _get_message_for(request.user, queue_id)
    kind = request.POST.get("as")
    if kind not in ("spam", "ham"):
        return HttpResponseBadRequest("Say as=spam or as=ham.")
    if not acts_for_a_recipient(message, request.user):
        return _refused(request, message, SENDER_ONLY)
    try:
        actions.learn_message(message, as_spam=kind == "spam", by=request.user, ip=client_ip(request))
    except PermissionDenied as exc:
        return _refused(request, message, str(exc))
    except ValidationError as exc:
        messages.error(request, f"Cannot learn from {message.queue_id}: {exc.messages[0]}.")
        return redirect("quarantine:detail", queue_id=queue_id)
    messages.success(request, f"SpamAssassin will learn message {message.queue_id} as {kind}.")
    return _back(request, reverse("quarantine:detail", args=[queue_id]))


def _list_sender(request: HttpRequest, queue_id: str, kind: str) -> HttpResponse:
    message = _get_message_for(request.user, queue_id)
    form = SenderFromMessageForm(request.POST, user=request.user, message=message, kind=kind)
    if not form.is_valid():
        forms = {"allow_form" if kind == "allow" else "block_form": form}
        return _render_detail(request, message, status=400, **forms)
    entry = form.save()
    _audit_entry(request, "list_add", entry, message=message)
    where = _scope_words(entry)
    messages.success(request, f"{entry.sender} is now on the {kind} list {where}.")
    return _back(request, reverse("quarantine:detail", args=[queue_id]))


@login_required
@require_POST
def allow_sender(request: HttpRequest, queue_id: str) -> HttpResponse:
    return _list_sender(request, queue_id, SenderListEntry.Kind.ALLOW)


@login_required
@require_POST
def block_sender(request: HttpRequest, queue_id: str) -> HttpResponse:
    return _list_sender(request, queue_id, SenderListEntry.Kind.BLOCK)


def _scope_words(entry: SenderListEntry) -> str:
    if entry.scope == SenderListEntry.Scope.GLOBAL:
        return "for everyone"
    if entry.scope == SenderListEntry.Scope.DOMAIN:
        return f"of {entry.domain}"
    return f"of {entry.user}"


def _audit_entry(request: HttpRequest, action: str, entry: SenderListEntry, message: Message | None = None) -> None:
    record_audit(action, user=request.user, ip=client_ip(request), message=message,
                 target=f"{entry.kind} {entry.sender} ({entry.scope}"
                        + (f" {entry.domain}" if entry.domain_id else "")
                        + (f" {entry.user}" if entry.user_id else "") + ")",
                 kind=entry.kind, sender=entry.sender, scope=entry.scope,
                 domain=entry.domain.name if entry.domain_id else None,
                 owner=entry.user.username if entry.user_id else None)


# --- Bulk actions --------------------------------------------------------------------------------------


@login_required
@require_POST
def bulk(request: HttpRequest) -> HttpResponse:
    form = BulkForm(request.POST)
    filters = QuarantineFilterForm(request.POST)
    back = reverse("quarantine:index") + ("?" + urlencode(filters.as_query()) if filters.as_query() else "")
    if not form.is_valid():
        for error in form.errors.get("__all__", []) + [f"{k}: {v[0]}" for k, v in form.errors.items()
                                                         if k != "__all__"]:
            messages.error(request, error)
        return redirect(back)
    if form.cleaned_data["target"] == "selected":
        # Ids outside the user's quarantine are dropped here, silently: for this user they do not exist.
        selection = list(quarantine_of(request.user).filter(queue_id__in=form.cleaned_data["ids"])
                         .values_list("pk", flat=True))
        stored_filters: dict = {}
    else:
        if filters.is_bound and not filters.is_valid():
            messages.error(request, "The filter is not valid; nothing was done.")
            return redirect(back)
        selection, stored_filters = None, filters.as_query()
    job = start_bulk_job(user=request.user, ip=client_ip(request), action=form.cleaned_data["action"],
                         selection=selection, filters=stored_filters)
    if job.finished:
        messages.success(request, _job_summary(job))
    else:
        messages.info(request, f"{job.get_action_display()} of {job.total} messages is under way.")
    return redirect(back)


def _job_summary(job: BulkJob) -> str:
    verb = {"release": "Released", "delete": "Deleted", "learn_spam": "Learnt as spam",
            "learn_ham": "Learnt as ham"}[job.action]
    text = f"{verb} {job.succeeded} of {job.total} messages"
    if job.skipped:
        text += f"; {job.skipped} no longer in the quarantine"
    if job.failed:
        text += f"; {job.failed} failed ({'; '.join(job.errors[:3])})"
    return text + "."


@login_required
@require_http_methods(["GET", "POST"])
def bulk_status(request: HttpRequest, job_id: int) -> JsonResponse:
    """The progress of one's own bulk job, as JSON for the page script. A POST (the page's poll) also works
    the next chunk when no Celery worker does: GET never changes anything."""
    job = get_object_or_404(BulkJob, pk=job_id, created_by=request.user)
    if request.method == "POST":
        advance_if_due(job)
        job.refresh_from_db()
    return JsonResponse({
        "id": job.pk, "action": job.action, "action_display": job.get_action_display(), "state": job.state,
        "finished": job.finished, "total": job.total, "done": job.done, "succeeded": job.succeeded,
        "skipped": job.skipped, "failed": job.failed, "errors": job.errors,
        "summary": _job_summary(job) if job.finished else "",
    })


# --- Allow and block lists -----------------------------------------------------------------------------


@login_required
def lists(request: HttpRequest) -> HttpResponse:
    if not role_of(request.user):
        raise Http404("No lists for this login")
    return _render_lists(request, ListEntryForm(user=request.user))


def _render_lists(request: HttpRequest, form: ListEntryForm, status: int = 200) -> HttpResponse:
    entries = list_entries_for(request.user)
    kind, query = request.GET.get("kind", ""), request.GET.get("q", "").strip().lower()
    if kind in SenderListEntry.Kind.values:
        entries = entries.filter(kind=kind)
    if query:
        entries = entries.filter(sender__icontains=query)
    page = Paginator(entries.order_by("kind", "scope", "sender", "pk"), 100).get_page(request.GET.get("page"))
    return render(request, "quarantine/lists.html", {
        "form": form, "page": page, "kind": kind, "q": query, "is_admin": role_of(request.user) == Role.ADMIN,
    }, status=status)


@login_required
@require_POST
def list_add(request: HttpRequest) -> HttpResponse:
    if not role_of(request.user):
        raise Http404("No lists for this login")
    form = ListEntryForm(request.POST, user=request.user)
    if not form.is_valid():
        return _render_lists(request, form, status=400)
    entry = form.save()
    _audit_entry(request, "list_add", entry)
    messages.success(request, f"{entry.sender} added to the {entry.kind} list {_scope_words(entry)}.")
    return redirect("quarantine:lists")


@login_required
@require_POST
def list_delete(request: HttpRequest, entry_id: int) -> HttpResponse:
    entry = get_object_or_404(list_entries_for(request.user), pk=entry_id)
    _audit_entry(request, "list_delete", entry)
    entry.delete()
    messages.success(request, f"{entry.sender} removed from the {entry.kind} list {_scope_words(entry)}.")
    return _back(request, reverse("quarantine:lists"))
