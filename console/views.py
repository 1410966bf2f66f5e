"""The administration pages (/manage/): users, domains and routes, the mail-flow settings, trusted networks,
the domains' spam policies.

Administrators reach all of it. Domain administrators reach the users of their domains only (plain users
whose every address is in one of their domains) and the spam policies of their domains; anything else of
theirs is a 404, and the pages meant for
administrators are a 403. Users have no business here at all (403). Every change writes an audit row.
"""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth import get_user_model
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db import transaction
from django.db.models import ProtectedError, Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from gateway.access import Role, address_domain, domains_of, role_of, role_of_account
from gateway.models import Domain, DomainSpamPolicy, MailFlowSettings, Route, TrustedNetwork, record_audit

from .forms import DomainForm, DomainSpamPolicyForm, MailFlowSettingsForm, RouteForm, TrustedNetworkForm, UserForm
from .http import client_ip

User = get_user_model()


def _require_admin(request: HttpRequest) -> None:
    if role_of(request.user) != Role.ADMIN:
        raise PermissionDenied("For administrators only")


def _require_manager(request: HttpRequest) -> str:
    role = role_of(request.user)
    if role not in (Role.ADMIN, Role.DOMAIN_ADMIN):
        raise PermissionDenied("For administrators only")
    return role


def managed_users(editor) -> QuerySet:
    """The logins this person may edit: everyone (administrators), or the plain users whose every
    address lies in the domain administrator's domains (one address elsewhere and the user is not
    theirs alone to manage: resetting that password would reach another domain's mail)."""
    role = role_of(editor)
    if role == Role.ADMIN:
        return User.objects.all()
    if role != Role.DOMAIN_ADMIN:
        return User.objects.none()
    mine = set(domains_of(editor))
    if not mine:
        return User.objects.none()
    near = Q()
    for domain in mine:
        near |= Q(email__iendswith="@" + domain) | Q(mail_profile__addresses__icontains="@" + domain)
    candidates = (User.objects.filter(near, is_superuser=False, mail_profile__role=Role.USER)
                  .select_related("mail_profile").distinct())
    ids = []
    for user in candidates:
        addresses = user.mail_profile.all_addresses()
        if addresses and all(address_domain(a) in mine for a in addresses):
            ids.append(user.pk)
    return User.objects.filter(pk__in=ids)


def _page(request: HttpRequest, template: str, context: dict, status: int = 200) -> HttpResponse:
    """Render a /manage/ page; the tabs need to know whether the viewer is an administrator."""
    return render(request, template, {"is_admin": role_of(request.user) == Role.ADMIN, **context}, status=status)


def _audit(request: HttpRequest, action: str, target: str, **detail) -> None:
    record_audit(action, user=request.user, ip=client_ip(request), target=target, **detail)


def _changes(form) -> dict:
    """What a model form changed, as {field: [old, new]}, for the audit row."""
    return {name: [str(form.initial.get(name, "")), str(form.cleaned_data.get(name, ""))]
            for name in form.changed_data}


@login_required
def index(request: HttpRequest) -> HttpResponse:
    role = _require_manager(request)
    return redirect("manage:users" if role == Role.DOMAIN_ADMIN else "manage:domains")


# --- Users ---------------------------------------------------------------------------------------------


@login_required
def users(request: HttpRequest) -> HttpResponse:
    _require_manager(request)
    qs = managed_users(request.user).select_related("mail_profile").prefetch_related("mail_profile__domains")
    query = request.GET.get("q", "").strip()
    if query:
        qs = qs.filter(Q(username__icontains=query) | Q(email__icontains=query)
                       | Q(mail_profile__addresses__icontains=query) | Q(first_name__icontains=query)
                       | Q(last_name__icontains=query))
    page = Paginator(qs.order_by("username"), 100).get_page(request.GET.get("page"))
    roles = dict(Role.choices)
    rows = [{"user": u, "role": roles[role_of_account(u)], "profile": getattr(u, "mail_profile", None)} for u in page]
    return _page(request, "manage/users.html", {
        "page": page, "rows": rows, "q": query,
        "my_domains": domains_of(request.user),
    })


@login_required
def user_new(request: HttpRequest) -> HttpResponse:
    _require_manager(request)
    form = UserForm(request.POST or None, editor=request.user)
    if request.method == "POST" and form.is_valid():
        with transaction.atomic():
            user, changed = form.save()
            _audit(request, "user_create", f"user {user.username}", role=role_of_account(user),
                   fields=[f for f in changed if f != "password"])
        messages.success(request, f"User {user.username} created.")
        return redirect("manage:users")
    return _page(request, "manage/user_form.html", {"form": form, "editing": None},
                  status=400 if form.is_bound else 200)


@login_required
def user_edit(request: HttpRequest, user_id: int) -> HttpResponse:
    _require_manager(request)
    account = get_object_or_404(managed_users(request.user), pk=user_id)
    form = UserForm(request.POST or None, editor=request.user, instance=account)
    if request.method == "POST" and form.is_valid():
        with transaction.atomic():
            user, changed = form.save()
            if changed:
                _audit(request, "user_update", f"user {user.username}",
                       fields=[f for f in changed if f != "password"])
            if "password" in changed:
                _audit(request, "user_password_reset", f"user {user.username}")
        messages.success(request, f"User {user.username} saved." if changed else "Nothing changed.")
        return redirect("manage:users")
    return _page(request, "manage/user_form.html", {"form": form, "editing": account},
                  status=400 if form.is_bound else 200)


# --- Domains -------------------------------------------------------------------------------------------


@login_required
def domains(request: HttpRequest) -> HttpResponse:
    _require_admin(request)
    qs = Domain.objects.select_related("route").prefetch_related("administrators__user")
    query = request.GET.get("q", "").strip().lower()
    if query:
        qs = qs.filter(name__icontains=query)
    page = Paginator(qs.order_by("name"), 100).get_page(request.GET.get("page"))
    return _page(request, "manage/domains.html", {"page": page, "q": query})


@login_required
def domain_new(request: HttpRequest) -> HttpResponse:
    _require_admin(request)
    return _domain_form(request, Domain())


@login_required
def domain_edit(request: HttpRequest, domain_id: int) -> HttpResponse:
    _require_admin(request)
    return _domain_form(request, get_object_or_404(Domain, pk=domain_id))


def _domain_form(request: HttpRequest, domain: Domain) -> HttpResponse:
    creating = domain.pk is None
    form = DomainForm(request.POST or None, instance=domain)
    if request.method == "POST" and form.is_valid():
        with transaction.atomic():
            before = set(domain.valid_recipients.values_list("address", flat=True)) if not creating else set()
            domain = form.save()
            after = set(form.cleaned_data["valid_recipients"])
            detail = _changes(form)
            detail.pop("valid_recipients", None)
            if before != after:
                detail["valid_recipients"] = {"added": sorted(after - before), "removed": sorted(before - after)}
            if creating or detail:
                _audit(request, "domain_create" if creating else "domain_update", f"domain {domain.name}",
                       route=domain.route.address, changes=detail)
        messages.success(request, f"Domain {domain.name} {'added' if creating else 'saved'}.")
        return redirect("manage:domains")
    return _page(request, "manage/domain_form.html", {"form": form, "domain": None if creating else domain},
                  status=400 if form.is_bound else 200)


@login_required
@require_POST
def domain_delete(request: HttpRequest, domain_id: int) -> HttpResponse:
    _require_admin(request)
    domain = get_object_or_404(Domain, pk=domain_id)
    with transaction.atomic():
        _audit(request, "domain_delete", f"domain {domain.name}", route=domain.route.address)
        domain.delete()
    messages.success(request, f"Domain {domain.name} removed: its mail is now refused as relaying.")
    return redirect("manage:domains")


# --- Spam policies of the domains --------------------------------------------------------------------


def managed_domains(editor) -> QuerySet:
    """The domains whose spam policy this person may edit: every one (administrators), their own (domain
    administrators)."""
    role = role_of(editor)
    if role == Role.ADMIN:
        return Domain.objects.all()
    if role == Role.DOMAIN_ADMIN:
        return Domain.objects.filter(name__in=domains_of(editor))
    return Domain.objects.none()


@login_required
def spam_policies(request: HttpRequest) -> HttpResponse:
    _require_manager(request)
    domains = managed_domains(request.user).select_related("spam_policy").order_by("name")
    page = Paginator(domains, 100).get_page(request.GET.get("page"))
    return _page(request, "manage/spam_policies.html", {"page": page, "config": MailFlowSettings.cached()})


@login_required
def spam_policy_edit(request: HttpRequest, domain_id: int) -> HttpResponse:
    _require_manager(request)
    domain = get_object_or_404(managed_domains(request.user), pk=domain_id)
    policy = DomainSpamPolicy.objects.filter(domain=domain).first() or DomainSpamPolicy(domain=domain)
    creating = policy.pk is None
    form = DomainSpamPolicyForm(request.POST or None, instance=policy)
    if request.method == "POST" and form.is_valid():
        with transaction.atomic():
            form.save()
            if creating or form.changed_data:
                _audit(request, "spam_policy_update", f"domain {domain.name}", changes=_changes(form))
        messages.success(request, f"The spam policy of {domain.name} is saved.")
        return redirect("manage:spam_policies")
    return _page(request, "manage/spam_policy_form.html", {"form": form, "domain": domain},
                 status=400 if form.is_bound else 200)


@login_required
@require_POST
def spam_policy_delete(request: HttpRequest, domain_id: int) -> HttpResponse:
    _require_manager(request)
    domain = get_object_or_404(managed_domains(request.user), pk=domain_id)
    with transaction.atomic():
        deleted, _ = DomainSpamPolicy.objects.filter(domain=domain).delete()
        if deleted:
            _audit(request, "spam_policy_delete", f"domain {domain.name}")
    messages.success(request, f"{domain.name} follows the mail-flow settings again; its users' own settings no "
                              f"longer apply.")
    return redirect("manage:spam_policies")


# --- Routes --------------------------------------------------------------------------------------------


@login_required
def routes(request: HttpRequest) -> HttpResponse:
    _require_admin(request)
    form = RouteForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        with transaction.atomic():
            route = form.save()
            _audit(request, "route_create", f"route {route.name}", address=route.address,
                   require_tls=route.require_tls)
        messages.success(request, f"Route {route.name} added.")
        return redirect("manage:routes")
    qs = Route.objects.prefetch_related("domains").order_by("name")
    return _page(request, "manage/routes.html", {"form": form, "routes": qs},
                  status=400 if form.is_bound else 200)


@login_required
def route_edit(request: HttpRequest, route_id: int) -> HttpResponse:
    _require_admin(request)
    route = get_object_or_404(Route, pk=route_id)
    before = route.address
    form = RouteForm(request.POST or None, instance=route)
    if request.method == "POST" and form.is_valid():
        with transaction.atomic():
            route = form.save()
            detail = _changes(form)
            if before != route.address:
                detail["address"] = [before, route.address]
            if detail:
                _audit(request, "route_update", f"route {route.name}", changes=detail)
        messages.success(request, f"Route {route.name} saved.")
        return redirect("manage:routes")
    return _page(request, "manage/route_form.html", {"form": form, "route": route},
                  status=400 if form.is_bound else 200)


@login_required
@require_POST
def route_delete(request: HttpRequest, route_id: int) -> HttpResponse:
    _require_admin(request)
    route = get_object_or_404(Route, pk=route_id)
    try:
        with transaction.atomic():
            _audit(request, "route_delete", f"route {route.name}", address=route.address)
            route.delete()
    except ProtectedError:
        names = ", ".join(route.domains.values_list("name", flat=True))
        messages.error(request, f"Route {route.name} is used by {names}: give those domains another route first.")
    else:
        messages.success(request, f"Route {route.name} removed.")
    return redirect("manage:routes")


# --- Mail-flow settings and trusted networks -----------------------------------------------------------


@login_required
def mail_settings(request: HttpRequest) -> HttpResponse:
    _require_admin(request)
    current = MailFlowSettings.load()
    form = MailFlowSettingsForm(request.POST or None, instance=current)
    if request.method == "POST" and form.is_valid():
        with transaction.atomic():
            form.save()
            if form.changed_data:
                _audit(request, "settings_update", "mail-flow settings", changes=_changes(form))
        messages.success(request, "Mail-flow settings saved." if form.changed_data else "Nothing changed.")
        return redirect("manage:settings")
    return _page(request, "manage/settings.html", {"form": form}, status=400 if form.is_bound else 200)


@login_required
def trusted_networks(request: HttpRequest) -> HttpResponse:
    _require_admin(request)
    form = TrustedNetworkForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        with transaction.atomic():
            network = form.save()
            _audit(request, "trusted_network_add", f"network {network.network}", description=network.description)
        messages.success(request, f"{network.network} may now relay through this gateway.")
        return redirect("manage:trusted_networks")
    return _page(request, "manage/trusted_networks.html", {
        "form": form, "networks": TrustedNetwork.objects.order_by("network")},
        status=400 if form.is_bound else 200)


@login_required
@require_POST
def trusted_network_delete(request: HttpRequest, network_id: int) -> HttpResponse:
    _require_admin(request)
    network = get_object_or_404(TrustedNetwork, pk=network_id)
    with transaction.atomic():
        _audit(request, "trusted_network_delete", f"network {network.network}")
        network.delete()
    messages.success(request, f"{network.network} may no longer relay.")
    return redirect("manage:trusted_networks")

