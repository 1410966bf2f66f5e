"""The directories page (/manage/directories/): the organisation's LDAP / Active Directory servers and IMAP
servers that logins, and a domain's recipient check, are checked against. Administrators only: a directory's
service account reads every person of the organisation.

Each directory is added and edited here, tested in words (the connection, what a login finds, what the
recipient check answers: gateway.directory.sync.check) and listed (`sync`: what the directory holds). The bind
password is never shown again; leaving its field empty keeps it.
"""

from __future__ import annotations

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.db import transaction
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.views.decorators.http import require_POST

from gateway.directory import ldap as directory_ldap
from gateway.directory.sync import check, sync
from gateway.models import Directory, DirectoryAddress

from .views import _audit, _changes, _page, _require_admin


class DirectoryForm(forms.ModelForm):
    error_css_class = "has-error"

    bind_password = forms.CharField(
        required=False, strip=False, label="Bind password",
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="The service account's password. Leave empty to keep the one saved.")

    class Meta:
        model = Directory
        fields = ["name", "kind", "domain", "active", "position", "uri", "ca_certificate", "timeout", "bind_dn",
                  "bind_password", "user_base", "user_filter", "mail_attribute", "alias_attributes", "group_type",
                  "group_base", "admin_group", "domain_admin_group", "recipient_filter", "positive_minutes",
                  "negative_minutes", "unreachable"]
        widgets = {"ca_certificate": forms.Textarea(attrs={"rows": 4, "class": "mono",
                                                           "placeholder": "-----BEGIN CERTIFICATE-----"})}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["domain"].empty_label = "(every domain: LDAP only)"
        self.saved_password = self.instance.bind_password if self.instance.pk else ""

    def clean(self) -> dict:
        data = super().clean()
        typed = data.get("bind_password") or ""
        if not data.get("bind_dn"):
            data["bind_password"] = ""  # anonymous: no password kept
        elif typed:
            data["bind_password"] = typed
        elif self.saved_password and self.instance.pk and (
                data.get("uri") != self.instance.uri or data.get("bind_dn") != self.instance.bind_dn):
            # The saved password goes only where it was typed for: another server or account asks for it again.
            self.add_error("bind_password", "Enter the password again: the server or the bind DN changed.")
        else:
            data["bind_password"] = self.saved_password
        self.instance.bind_password = data.get("bind_password", "")
        return data

    def password_changed(self) -> bool:
        return self.cleaned_data.get("bind_password", "") != self.saved_password


class CheckForm(forms.Form):
    error_css_class = "has-error"

    login = forms.CharField(required=False, max_length=320, help_text="What a person types to log in")
    password = forms.CharField(required=False, strip=False, widget=forms.PasswordInput(render_value=False),
                               help_text="Needed for an IMAP server only; not kept")
    address = forms.CharField(required=False, max_length=320, help_text="An address for the recipient check")


@login_required
def directories(request: HttpRequest) -> HttpResponse:
    _require_admin(request)
    rows = Directory.objects.select_related("domain")
    return _page(request, "manage/directories.html", {"directories": rows})


@login_required
def directory_new(request: HttpRequest) -> HttpResponse:
    _require_admin(request)
    return _form(request, Directory())


@login_required
def directory_edit(request: HttpRequest, directory_id: int) -> HttpResponse:
    _require_admin(request)
    return _form(request, get_object_or_404(Directory, pk=directory_id))


def _form(request: HttpRequest, directory: Directory) -> HttpResponse:
    """The settings form: shown, or saved and audited."""
    creating = directory.pk is None
    form = DirectoryForm(request.POST or None, instance=directory)
    if request.method == "POST" and form.is_valid():
        with transaction.atomic():
            directory = form.save()
            detail = _changes(form)
            detail.pop("bind_password", None)
            if form.password_changed():
                detail["bind_password"] = "changed"  # that it changed, never what to
            if creating or detail:
                _audit(request, "directory_create" if creating else "directory_update", f"directory {directory.name}",
                       changes=detail)
        messages.success(request, f"Directory {directory.name} {'added' if creating else 'saved'}.")
        return redirect("manage:directory_edit", directory.pk)
    return _render(request, directory, form, status=400 if form.is_bound else 200)


def _render(request: HttpRequest, directory: Directory, form: DirectoryForm, *, results=None, check_form=None,
            status: int = 200) -> HttpResponse:
    """The directory's page: its test (with the results of one), its settings, and what it holds."""
    addresses, count = None, 0
    if directory.pk is not None:
        listed = DirectoryAddress.objects.filter(directory=directory)
        count = listed.count()
        query = request.GET.get("q", "").strip().lower()
        if query:
            listed = listed.filter(address__icontains=query)
        addresses = Paginator(listed.order_by("address"), 100).get_page(request.GET.get("page"))
    return _page(request, "manage/directory_form.html", {
        "form": form, "directory": directory if directory.pk is not None else None,
        "check_form": check_form or CheckForm(), "results": results, "addresses": addresses,
        "q": request.GET.get("q", ""), "address_count": count}, status=status)


@login_required
@require_POST
def directory_check(request: HttpRequest, directory_id: int) -> HttpResponse:
    _require_admin(request)
    directory = get_object_or_404(Directory, pk=directory_id)
    check_form = CheckForm(request.POST)
    results = []
    if check_form.is_valid():
        data = check_form.cleaned_data
        results = check(directory, login=data["login"], password=data["password"], address=data["address"])
    _audit(request, "directory_test", f"directory {directory.name}", login=check_form.data.get("login", "")[:320],
           address=check_form.data.get("address", "")[:320], ok=all(line.ok for line in results))
    return _render(request, directory, DirectoryForm(instance=directory), results=results,
                   check_form=CheckForm(initial={"login": check_form.data.get("login", ""),
                                                 "address": check_form.data.get("address", "")}))


@login_required
@require_POST
def directory_sync(request: HttpRequest, directory_id: int) -> HttpResponse:
    _require_admin(request)
    directory = get_object_or_404(Directory, pk=directory_id)
    try:
        result = sync(directory, user=request.user)
    except (directory_ldap.Unreachable, ValueError) as exc:
        messages.error(request, f"{directory.name}: {exc}")
    else:
        messages.success(request, f"{directory.name}: {result.entries} entries, {len(result.addresses)} addresses "
                                  f"({result.added} new, {result.removed} gone).")
    return redirect("manage:directory_edit", directory.pk)


@login_required
@require_POST
def directory_delete(request: HttpRequest, directory_id: int) -> HttpResponse:
    _require_admin(request)
    directory = get_object_or_404(Directory, pk=directory_id)
    with transaction.atomic():
        _audit(request, "directory_delete", f"directory {directory.name}")
        directory.delete()
    messages.success(request, f"Directory {directory.name} removed: its people can no longer log in.")
    return redirect("manage:directories")
