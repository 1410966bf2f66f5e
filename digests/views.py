"""The pages behind a digest's links, reached without a login: the token in the link is the permission.

A GET only shows: the confirmation page (what the link would do, to which message) or the preview. The action
is the POST of the confirmation page's form (CSRF-protected): mail scanners that fetch every link of a message
(Safe Links and the like) change nothing. A token that is not one, or one used under another message or action,
is a 404. The List-Unsubscribe link leads to the digest's frequency; its POST (RFC 8058 one-click, sent by mail
clients without cookies) turns the digests off.
"""

from __future__ import annotations

from django import forms
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.cache import never_cache
from django.views.decorators.clickjacking import xframe_options_sameorigin
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from console.http import client_ip
from reports.views import preview_response

from . import links
from .models import DigestLink, Frequency, Subscription

CONFIRM = {
    DigestLink.Action.RELEASE: ("Release this message?", "Release it", "It is delivered to {address}, as it was "
                                "received, once."),
    DigestLink.Action.RELEASE_ALLOW: ("Release this message and allow its sender?", "Release it and allow the "
                                      "sender", "It is delivered to {address}, once, and mail from {sender} is "
                                      "not held again."),
    DigestLink.Action.DELETE: ("Delete this message?", "Delete it", "Its copy for {address} is deleted from the "
                               "quarantine; it cannot be released afterwards."),
}


def _link_or_404(queue_id: str, action: str, token: str) -> DigestLink:
    link = links.find(queue_id, action, token)
    if link is None:
        raise Http404("No such link")
    return link


def _context(link: DigestLink, reason: str | None) -> dict:
    message = link.message
    title, button, effect = CONFIRM.get(link.action, ("Preview", "", ""))
    return {"link": link, "message": message, "reason": reason, "title": title, "button": button,
            "effect": effect.format(address=link.recipient.address, sender=message.envelope_sender or "<>"),
            "why": _why_held(message)}


def _why_held(message) -> str:
    if message.virus_names:
        return "Virus: " + ", ".join(message.virus_names)
    blocked = [a.get("name") or "unnamed" for a in message.attachments if a.get("blocked")]
    if blocked:
        return "Blocked attachment: " + ", ".join(blocked)
    if message.spam_score is not None:
        rules = ", ".join(r["name"] for r in sorted(message.spam_rules, key=lambda r: -r.get("score", 0))[:5])
        return f"Spam score {message.spam_score:.1f}" + (f" ({rules})" if rules else "")
    return message.get_verdict_display() or "Held"


@never_cache
@require_http_methods(["GET", "POST"])
def link(request: HttpRequest, queue_id: str, action: str, token: str) -> HttpResponse:
    found = _link_or_404(queue_id, action, token)
    ip = client_ip(request)
    if found.action == DigestLink.Action.PREVIEW:
        if request.method != "GET":
            return HttpResponse("A preview link only shows the message.", status=405, content_type="text/plain")
        reason = links.why_not(found)
        links.audit(found, ip=ip, step="viewed", outcome=reason or "preview shown")
        return render(request, "digests/preview.html", {**_context(found, reason), "token": token},
                      status=410 if reason else 200)
    if request.method == "GET":
        reason = links.why_not(found)
        links.audit(found, ip=ip, step="viewed", outcome=reason or "confirmation page shown")
        return render(request, "digests/confirm.html", _context(found, reason))
    done, text = links.use(found, ip=ip)
    found.refresh_from_db()
    return render(request, "digests/done.html", {**_context(found, None), "done": done, "text": text},
                  status=200 if done else 410)


@never_cache
@xframe_options_sameorigin
@require_GET
def preview_content(request: HttpRequest, queue_id: str, token: str) -> HttpResponse:
    found = _link_or_404(queue_id, DigestLink.Action.PREVIEW, token)
    if links.why_not(found):
        raise Http404("This preview is no longer available")
    return preview_response(request, found.message)


class FrequencyForm(forms.Form):
    frequency = forms.ChoiceField(label="Send me the quarantine report")

    def __init__(self, *args, subscription: Subscription, **kwargs):
        super().__init__(*args, **kwargs)
        choices = list(Frequency.choices)
        if subscription.kind != Subscription.Kind.DOMAIN:
            choices = [("", "As the administrator set it (the default)")] + choices
        self.fields["frequency"].choices = choices
        self.fields["frequency"].required = False
        self.fields["frequency"].initial = subscription.frequency


def _unsubscribe_or_404(token: str):
    found = links.find_unsubscribe(token)
    if found is None:
        raise Http404("No such link")
    return found


@csrf_exempt  # RFC 8058: mail clients POST without a session or a CSRF token; the token in the URL is the key
@never_cache
@require_http_methods(["GET", "POST"])
def unsubscribe(request: HttpRequest, token: str) -> HttpResponse:
    found = _unsubscribe_or_404(token)
    if request.method == "POST":
        links.set_frequency(found, Frequency.OFF, ip=client_ip(request), one_click=True)
        return HttpResponse("Unsubscribed: no more quarantine reports are sent to this address.\n",
                            content_type="text/plain")
    return render(request, "digests/frequency.html",
                  {"subscription": found.subscription, "form": FrequencyForm(subscription=found.subscription),
                   "token": token})


@never_cache
@require_POST
def frequency(request: HttpRequest, token: str) -> HttpResponse:
    found = _unsubscribe_or_404(token)
    form = FrequencyForm(request.POST, subscription=found.subscription)
    saved = False
    if form.is_valid():
        links.set_frequency(found, form.cleaned_data["frequency"], ip=client_ip(request), one_click=False)
        saved = True
        form = FrequencyForm(subscription=found.subscription)
    return render(request, "digests/frequency.html",
                  {"subscription": found.subscription, "form": form, "token": token, "saved": saved},
                  status=200 if saved else 400)
