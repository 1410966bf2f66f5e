"""My account (/account/): one's password, how often one gets the quarantine report, one's addresses (read-only
unless ACCOUNT_EDIT_ADDRESSES), one's own allow and block list, one's API tokens (the key shown once), and
one's spam filter (/account/spam: one's own thresholds within the limits of one's domains, and whether spam
is tagged instead of quarantined, as far as the domains' spam policies allow), and one's two-factor login
(/account/two-factor/, console/twofactor.py).

Everything here is the login's own: another user's list entry or token is a 404.
"""

from __future__ import annotations

from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth import update_session_auth_hash
from django.contrib.auth.decorators import login_required
from django.contrib.auth.forms import PasswordChangeForm
from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import path
from django.views.decorators.http import require_POST

from digests.models import Frequency, Subscription
from gateway.access import Role, address_domain, addresses_of, domains_of, role_of
from gateway.models import (
    Domain,
    DomainSpamPolicy,
    MailFlowSettings,
    SenderListEntry,
    UserProfile,
    UserSpamPolicy,
    record_audit,
    validate_sender_pattern,
)
from gateway.scan import spampolicy
from reports.models import ApiToken

from . import twofactor
from .http import client_ip


class DigestForm(forms.Form):
    own = forms.ChoiceField(label="Report of my quarantined mail", required=False)
    domains = forms.ChoiceField(label="Report of all quarantined mail of my domains", required=False,
                                choices=Frequency.choices)

    def __init__(self, *args, user, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["own"].choices = [("", "As the administrator set it")] + list(Frequency.choices)
        own = Subscription.objects.filter(kind=Subscription.Kind.USER, user=user).first()
        self.fields["own"].initial = own.frequency if own else ""
        if role_of(user) == Role.DOMAIN_ADMIN:
            mine = Subscription.objects.filter(kind=Subscription.Kind.DOMAIN, user=user).first()
            self.fields["domains"].initial = (mine.frequency if mine else "") or Frequency.OFF
        else:
            del self.fields["domains"]

    def save(self, user) -> None:
        for kind, name in ((Subscription.Kind.USER, "own"), (Subscription.Kind.DOMAIN, "domains")):
            if name in self.fields:
                Subscription.objects.update_or_create(kind=kind, user=user, address="",
                                                      defaults={"frequency": self.cleaned_data[name]})


class ListEntryForm(forms.Form):
    kind = forms.ChoiceField(choices=SenderListEntry.Kind.choices, initial=SenderListEntry.Kind.ALLOW, label="List")
    sender = forms.CharField(max_length=320, help_text="An address, @domain, *.domain, an IP address or a network")
    comment = forms.CharField(max_length=200, required=False)

    def clean_sender(self) -> str:
        sender = self.cleaned_data["sender"].strip().lower()
        try:
            validate_sender_pattern(sender)
        except ValidationError as exc:
            raise ValidationError(exc.messages[0]) from None
        return sender


class AddressesForm(forms.Form):
    aliases = forms.CharField(widget=forms.Textarea(attrs={"rows": 4}), required=False,
                              help_text="One address per line, in our domains")

    def __init__(self, *args, user, **kwargs):
        super().__init__(*args, **kwargs)
        self.user = user

    def clean_aliases(self) -> str:
        ours = set(Domain.objects.values_list("name", flat=True))
        taken = {a for p in UserProfile.objects.exclude(user=self.user).select_related("user")
                 for a in p.all_addresses()}
        found = []
        for line in self.cleaned_data["aliases"].splitlines():
            address = line.strip().lower()
            if not address:
                continue
            try:
                validate_email(address)
            except ValidationError:
                raise ValidationError(f"{address}: not an e-mail address") from None
            if address.rpartition("@")[2] not in ours:
                raise ValidationError(f"{address}: not in one of our domains")
            if address in taken:
                raise ValidationError(f"{address}: another login's address")
            found.append(address)
        return "\n".join(dict.fromkeys(found))


class SpamFilterForm(forms.ModelForm):
    """A user's own spam policy, built from the spam policies of the domains of their addresses: the
    thresholds only where a domain lets its users choose them, each within the limits of every such domain
    (mail to an address is judged within its own domain's limits), and the opt-out of the quarantine only
    where a domain allows it."""

    error_css_class = "has-error"

    class Meta:
        model = UserSpamPolicy
        fields = ["spam_threshold", "high_spam_threshold", "skip_quarantine"]
        labels = {"skip_quarantine": "Deliver my spam tagged instead of quarantining it"}

    def __init__(self, *args, user, **kwargs):
        super().__init__(*args, instance=UserSpamPolicy.objects.filter(user=user).first() or UserSpamPolicy(user=user),
                         **kwargs)
        names = {address_domain(a) for a in addresses_of(user)}
        self.domains = list(DomainSpamPolicy.objects.filter(domain__name__in=names).select_related("domain")
                            .order_by("domain__name"))
        self.choosing = [p for p in self.domains if p.users_may_choose]
        if not self.choosing:
            del self.fields["spam_threshold"], self.fields["high_spam_threshold"]
        else:
            limits = "; ".join(f"{p.domain.name}: {_range(p)}" for p in self.choosing)
            for name in ("spam_threshold", "high_spam_threshold"):
                self.fields[name].help_text += f". Allowed: {limits}"
        if not any(p.users_may_skip_quarantine for p in self.domains):
            del self.fields["skip_quarantine"]

    @property
    def offers_anything(self) -> bool:
        return bool(self.fields)

    def _within_limits(self, name: str) -> float | None:
        value = self.cleaned_data.get(name)
        if value is None:
            return None
        outside = [p for p in self.choosing if not p.within_limits(value)]
        if outside:
            raise ValidationError("; ".join(f"{p.domain.name} allows {_range(p)}" for p in outside))
        return value

    def clean_spam_threshold(self) -> float | None:
        return self._within_limits("spam_threshold")

    def clean_high_spam_threshold(self) -> float | None:
        return self._within_limits("high_spam_threshold")


def _range(policy: DomainSpamPolicy) -> str:
    low, high = policy.user_min_threshold, policy.user_max_threshold
    if low is None and high is None:
        return "any threshold"
    if low is None:
        return f"up to {high:g}"
    if high is None:
        return f"from {low:g}"
    return f"from {low:g} to {high:g}"


def _page(request: HttpRequest, *, status: int = 200, new_key: str | None = None, **forms_) -> HttpResponse:
    user = request.user
    profile = getattr(user, "mail_profile", None)
    return render(request, "console/account.html", {
        "role": role_of(user), "addresses": addresses_of(user), "domains": domains_of(user),
        "aliases": profile.addresses if profile else "",
        "directory": profile.directory if profile else None,
        "edit_addresses": settings.ACCOUNT_EDIT_ADDRESSES and not (profile and profile.directory_id),
        "password_form": forms_.get("password_form") or PasswordChangeForm(user),
        "digest_form": forms_.get("digest_form") or DigestForm(user=user),
        "list_form": forms_.get("list_form") or ListEntryForm(),
        "addresses_form": forms_.get("addresses_form") or AddressesForm(user=user, initial={
            "aliases": profile.addresses if profile else ""}),
        "entries": SenderListEntry.objects.filter(scope=SenderListEntry.Scope.USER, user=user).order_by(
            "kind", "sender"),
        "tokens": ApiToken.objects.filter(user=user), "new_key": new_key,
        "two_factor": twofactor.confirmed_device(user) is not None,
    }, status=status)


def _directory_of(user):
    """The directory an account logs in with (its password and addresses are the directory's), or None."""
    profile = getattr(user, "mail_profile", None)
    return profile.directory if profile is not None else None


@login_required
def account(request: HttpRequest) -> HttpResponse:
    return _page(request)


@login_required
@require_POST
def password(request: HttpRequest) -> HttpResponse:
    if _directory_of(request.user) is not None:
        return HttpResponse("Your password is your directory's: change it there.", status=403,
                            content_type="text/plain")
    form = PasswordChangeForm(request.user, request.POST)
    if not form.is_valid():
        return _page(request, status=400, password_form=form)
    form.save()
    update_session_auth_hash(request, form.user)
    record_audit("password_change", user=request.user, ip=client_ip(request), target=request.user.get_username())
    messages.success(request, "Your password is changed.")
    return redirect("account")


@login_required
@require_POST
def digests(request: HttpRequest) -> HttpResponse:
    form = DigestForm(request.POST, user=request.user)
    if not form.is_valid():
        return _page(request, status=400, digest_form=form)
    form.save(request.user)
    record_audit("digest_frequency", user=request.user, ip=client_ip(request), target=request.user.get_username(),
                 **{k: v for k, v in form.cleaned_data.items()})
    messages.success(request, "Your quarantine report settings are saved.")
    return redirect("account")


@login_required
@require_POST
def addresses(request: HttpRequest) -> HttpResponse:
    profile = getattr(request.user, "mail_profile", None)
    if not settings.ACCOUNT_EDIT_ADDRESSES or profile is None or profile.directory_id:
        return HttpResponse("Your addresses are set by an administrator, or by your directory.", status=403,
                            content_type="text/plain")
    form = AddressesForm(request.POST, user=request.user)
    if not form.is_valid():
        return _page(request, status=400, addresses_form=form)
    profile.addresses = form.cleaned_data["aliases"]
    profile.save(update_fields=["addresses"])
    record_audit("addresses_change", user=request.user, ip=client_ip(request), target=request.user.get_username(),
                 aliases=profile.addresses.splitlines())
    messages.success(request, "Your addresses are saved.")
    return redirect("account")


@login_required
@require_POST
def list_add(request: HttpRequest) -> HttpResponse:
    if not role_of(request.user):
        return HttpResponse("This login has no mail.", status=403, content_type="text/plain")
    form = ListEntryForm(request.POST)
    if not form.is_valid():
        return _page(request, status=400, list_form=form)
    entry, created = SenderListEntry.objects.get_or_create(
        kind=form.cleaned_data["kind"], scope=SenderListEntry.Scope.USER, sender=form.cleaned_data["sender"],
        domain=None, user=request.user, defaults={"comment": form.cleaned_data["comment"], "created_by": request.user})
    if created:
        record_audit("list_add", user=request.user, ip=client_ip(request),
                     target=f"{entry.kind} {entry.sender} (user {request.user})", kind=entry.kind,
                     sender=entry.sender, scope=entry.scope, owner=request.user.get_username())
    messages.success(request, f"{entry.sender} is on your {entry.kind} list.")
    return redirect("account")


@login_required
@require_POST
def list_delete(request: HttpRequest, entry_id: int) -> HttpResponse:
    entry = get_object_or_404(SenderListEntry, pk=entry_id, scope=SenderListEntry.Scope.USER, user=request.user)
    record_audit("list_delete", user=request.user, ip=client_ip(request),
                 target=f"{entry.kind} {entry.sender} (user {request.user})", kind=entry.kind, sender=entry.sender,
                 scope=entry.scope, owner=request.user.get_username())
    entry.delete()
    messages.success(request, f"{entry.sender} is off your {entry.kind} list.")
    return redirect("account")


def _spam_page(request: HttpRequest, form: SpamFilterForm, status: int = 200) -> HttpResponse:
    config = MailFlowSettings.cached()
    policies = [(address, spampolicy.for_recipient(address, config)) for address in addresses_of(request.user)]
    return render(request, "console/spam_filter.html", {"form": form, "policies": policies}, status=status)


@login_required
def spam_filter(request: HttpRequest) -> HttpResponse:
    if request.method != "POST":
        return _spam_page(request, SpamFilterForm(user=request.user))
    form = SpamFilterForm(request.POST, user=request.user)
    if not form.offers_anything:
        return HttpResponse("Your domains' spam policies leave you nothing to choose.", status=403,
                            content_type="text/plain")
    if not form.is_valid():
        return _spam_page(request, form, status=400)
    form.save()
    record_audit("spam_filter_change", user=request.user, ip=client_ip(request), target=request.user.get_username(),
                 **{name: value for name, value in form.cleaned_data.items()})
    messages.success(request, "Your spam filter settings are saved.")
    return redirect("account_spam")


@login_required
@require_POST
def token_new(request: HttpRequest) -> HttpResponse:
    name = request.POST.get("name", "").strip()[:100]
    token, key = ApiToken.create_for(request.user, name)
    record_audit("api_token_create", user=request.user, ip=client_ip(request), target=f"{token.prefix}…",
                 name=name)
    # Shown on this response only: the database keeps its hash.
    return _page(request, new_key=key)


@login_required
@require_POST
def token_revoke(request: HttpRequest, token_id: int) -> HttpResponse:
    token = get_object_or_404(ApiToken, pk=token_id, user=request.user)
    record_audit("api_token_revoke", user=request.user, ip=client_ip(request), target=f"{token.prefix}…",
                 name=token.name)
    token.delete()
    messages.success(request, f"The token {token.prefix}… is revoked.")
    return redirect("account")


urlpatterns = [
    path("", account, name="account"),
    path("password", password, name="account_password"),
    path("digests", digests, name="account_digests"),
    path("addresses", addresses, name="account_addresses"),
    path("lists/add", list_add, name="account_list_add"),
    path("lists/<int:entry_id>/delete", list_delete, name="account_list_delete"),
    path("spam", spam_filter, name="account_spam"),
    path("tokens/new", token_new, name="account_token_new"),
    path("tokens/<int:token_id>/revoke", token_revoke, name="account_token_revoke"),
    path("two-factor/", twofactor.page, name="two_factor"),
    path("two-factor/start", twofactor.start, name="two_factor_start"),
    path("two-factor/confirm", twofactor.confirm, name="two_factor_confirm"),
    path("two-factor/recovery-codes", twofactor.recovery_codes, name="two_factor_recovery_codes"),
    path("two-factor/disable", twofactor.disable, name="two_factor_disable"),
]
