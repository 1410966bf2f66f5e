"""Forms of the administration pages: users, domains, routes, the mail-flow settings, trusted networks, the
domains' spam policies.

Every form explains what is wrong in words a mail administrator uses, and every form that a domain
administrator may fill in is built for that person: the choices it offers are the ones they may make.
"""

from __future__ import annotations

import ipaddress

from django import forms
from django.contrib.auth import get_user_model, password_validation
from django.core.exceptions import ValidationError
from django.core.validators import validate_email

from gateway.access import Role, address_domain, domains_of, role_of, role_of_account
from gateway.models import (
    Action,
    Domain,
    DomainSpamPolicy,
    MailFlowSettings,
    Route,
    TrustedNetwork,
    UserProfile,
    ValidRecipient,
    parse_host_port,
    validate_domain_name,
)

from .usernames import HELP_TEXT as USERNAME_HELP
from .usernames import username_taken, validate_username

User = get_user_model()


def split_lines(value: str) -> list[str]:
    return [line.strip().lower() for line in value.splitlines() if line.strip()]


def validate_host(host: str) -> None:
    """A host name or an IP address literal: what a route's mail server is called."""
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    if host == "localhost":
        return
    validate_domain_name(host)


# --- Users -------------------------------------------------------------------------------------------


class UserForm(forms.Form):
    """Create or edit a login with its profile. An administrator sets any role and domains; a domain
    administrator creates and edits users whose every address lies in their own domains."""

    error_css_class = "has-error"

    username = forms.CharField(max_length=150, help_text=f"The login name. {USERNAME_HELP}")
    email = forms.EmailField(required=False, help_text="The user's main address: their mail is what they see")
    first_name = forms.CharField(max_length=150, required=False)
    last_name = forms.CharField(max_length=150, required=False)
    role = forms.ChoiceField(choices=Role.choices, initial=Role.USER)
    domains = forms.ModelMultipleChoiceField(
        queryset=Domain.objects.all(), required=False, widget=forms.CheckboxSelectMultiple,
        help_text="For a domain administrator: the domains whose mail, lists and users they manage")
    addresses = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 4}), required=False,
        help_text="Further addresses and aliases of this user, one per line")
    is_active = forms.BooleanField(required=False, initial=True, label="Active",
                                   help_text="An inactive login cannot sign in")
    password1 = forms.CharField(label="New password", required=False, strip=False,
                                widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}))
    password2 = forms.CharField(label="New password again", required=False, strip=False,
                                widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}))

    def __init__(self, *args, editor, instance=None, **kwargs):
        self.editor = editor
        self.instance = instance
        self.editor_role = role_of(editor)
        if instance is not None and "initial" not in kwargs:
            profile = getattr(instance, "mail_profile", None)
            kwargs["initial"] = {
                "username": instance.username, "email": instance.email, "first_name": instance.first_name,
                "last_name": instance.last_name, "is_active": instance.is_active,
                "role": role_of_account(instance),
                "domains": list(profile.domains.all()) if profile else [],
                "addresses": profile.addresses if profile else "",
            }
        super().__init__(*args, **kwargs)
        if instance is None:
            self.fields["password1"].required = self.fields["password2"].required = True
            self.fields["password1"].label = "Password"
            self.fields["password2"].label = "Password again"
        else:
            self.fields["password1"].help_text = "Leave empty to keep the current password"
        if self.editor_role != Role.ADMIN:
            # A domain administrator manages plain users only, and cannot hand out domains.
            del self.fields["role"]
            del self.fields["domains"]
            mine = ", ".join(domains_of(editor)) or "none"
            self.fields["email"].required = True
            self.fields["email"].help_text = f"An address in one of your domains ({mine})"
        self.fields["password1"].help_text = (self.fields["password1"].help_text + " "
                                              + password_validation.password_validators_help_text_html()).strip()
        profile = getattr(instance, "mail_profile", None) if instance is not None else None
        self.directory = profile.directory if profile is not None else None
        if self.directory is not None:
            # The directory says who this is at each login: what is edited here would be undone by the next one,
            # and a password of ours would open a second door beside the directory's.
            for name in ("username", "email", "first_name", "last_name", "role", "domains", "addresses"):
                if name in self.fields:
                    self.fields[name].disabled = True
            del self.fields["password1"], self.fields["password2"]
            self.fields["is_active"].help_text = (f"Logs in with the directory {self.directory.name}, which sets "
                                                  "everything else here at each login. An inactive login cannot "
                                                  "sign in, whatever the directory says.")

    def clean_username(self) -> str:
        username = self.cleaned_data["username"].strip()
        # A login made before names were checked keeps its name until it is changed; a new or changed name
        # must be plain (console.usernames says why).
        if self.instance is None or username != self.instance.username:
            validate_username(username)
        if username_taken(username, exclude_pk=self.instance.pk if self.instance is not None else None):
            raise ValidationError("This login name is taken; choose another.")
        return username

    def clean_email(self) -> str:
        email = self.cleaned_data["email"].strip().lower()
        if email and self.editor_role != Role.ADMIN and address_domain(email) not in domains_of(self.editor):
            raise ValidationError(f"{email} is not in one of your domains.")
        return email

    def clean_addresses(self) -> str:
        addresses = split_lines(self.cleaned_data["addresses"])
        bad = []
        for address in addresses:
            try:
                validate_email(address)
            except ValidationError:
                bad.append(address)
        if bad:
            raise ValidationError(f"Not an e-mail address: {', '.join(bad)}. Write one address per line.")
        if self.editor_role != Role.ADMIN:
            mine = set(domains_of(self.editor))
            foreign = [a for a in addresses if address_domain(a) not in mine]
            if foreign:
                raise ValidationError(f"Not in one of your domains: {', '.join(foreign)}.")
        return "\n".join(dict.fromkeys(addresses))

    def clean(self) -> dict:
        data = super().clean()
        role = data.get("role", Role.USER)
        if self.instance is not None and self.instance.pk == self.editor.pk:
            # Nobody locks themselves out by accident; another administrator can do it for them.
            if role != Role.ADMIN and self.editor_role == Role.ADMIN:
                self.add_error("role", "You cannot take away your own administrator role.")
            if not data.get("is_active", True):
                self.add_error("is_active", "You cannot deactivate your own login.")
        if role == Role.DOMAIN_ADMIN and "domains" in self.fields and not data.get("domains"):
            self.add_error("domains", "A domain administrator needs at least one domain.")
        if role == Role.USER and not data.get("email") and not data.get("addresses"):
            self.add_error("email", "A user needs at least one address, or they will see no mail at all.")
        password1, password2 = data.get("password1"), data.get("password2")
        if password1 or password2:
            if password1 != password2:
                self.add_error("password2", "The two passwords differ.")
            else:
                # Check against the would-be account, so "similar to the user name" is caught on creation too.
                probe = self.instance or User(username=data.get("username", ""), email=data.get("email", ""),
                                              first_name=data.get("first_name", ""),
                                              last_name=data.get("last_name", ""))
                try:
                    password_validation.validate_password(password1, probe)
                except ValidationError as exc:
                    self.add_error("password1", exc)
        return data

    def save(self):
        """Write the login and its profile; returns (user, changed field names)."""
        data = self.cleaned_data
        user = self.instance or User()
        changed = [name for name in ("username", "email", "first_name", "last_name", "is_active")
                   if getattr(user, name) != data[name]]
        for name in ("username", "email", "first_name", "last_name", "is_active"):
            setattr(user, name, data[name])
        role = data.get("role", Role.USER)
        # An administrator is an administrator of the Django admin too (where the mail flow is also edited).
        user.is_staff = user.is_superuser = role == Role.ADMIN
        if data.get("password1") and self.directory is None:
            user.set_password(data["password1"])
            changed.append("password")
        user.save()
        profile, _ = UserProfile.objects.get_or_create(user=user)
        if profile.role != role:
            changed.append("role")
        if profile.addresses != data["addresses"]:
            changed.append("addresses")
        profile.role = role
        profile.addresses = data["addresses"]
        profile.save()
        if "domains" in data:
            domains = list(data["domains"]) if role == Role.DOMAIN_ADMIN else []
            if set(profile.domains.all()) != set(domains):
                changed.append("domains")
            profile.domains.set(domains)
        return user, changed


# --- Domains and routes ----------------------------------------------------------------------------


class RouteForm(forms.ModelForm):
    """A route, entered as HOST:PORT, the way a mail administrator writes it."""

    error_css_class = "has-error"

    address = forms.CharField(label="Mail server", max_length=300,
                              help_text="HOST:PORT of the mail server that holds the mailboxes, e.g. "
                                        "mail.example.org:25 or [2001:db8::1]:25")

    class Meta:
        model = Route
        fields = ["name", "require_tls"]
        help_texts = {"name": "A name for this route, e.g. 'Exchange' or 'mail.example.org'"}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["name"].required = False
        self.fields["name"].help_text += " (default: the address)"
        if self.instance.pk:
            self.initial["address"] = self.instance.address
        self.order_fields(["name", "address", "require_tls"])

    def clean_address(self) -> tuple[str, int]:
        try:
            host, port = parse_host_port(self.cleaned_data["address"], default_port=25)
        except ValueError as exc:
            raise ValidationError(f"{exc}. Write HOST:PORT, e.g. mail.example.org:25.") from None
        try:
            validate_host(host)
        except ValidationError:
            raise ValidationError(f"{host!r} is neither a host name nor an IP address.") from None
        clash = Route.objects.filter(host=host, port=port).exclude(pk=self.instance.pk).first()
        if clash:
            raise ValidationError(f"The route {clash.name!r} already goes to {host}:{port}.")
        return host, port

    def clean(self) -> dict:
        data = super().clean()
        if "address" in data:
            self.instance.host, self.instance.port = data["address"]
            if not data.get("name"):
                data["name"] = f"{self.instance.host}:{self.instance.port}"
                self.instance.name = data["name"]
                if Route.objects.filter(name=data["name"]).exclude(pk=self.instance.pk).exists():
                    self.add_error("name", f"A route is already named {data['name']!r}.")
        return data


class DomainForm(forms.ModelForm):
    """A protected domain with its route, its recipient check and (for the 'list' check) its addresses."""

    error_css_class = "has-error"

    new_route = forms.CharField(
        required=False, label="…or a new route", max_length=300,
        help_text="HOST:PORT of a mail server that has no route yet; it is created with the domain")
    valid_recipients = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 6}), required=False,
        help_text="The addresses that exist at this domain, one per line; used when the recipient check is "
                  "'Only the listed addresses'")

    class Meta:
        model = Domain
        fields = ["name", "route", "active", "recipient_check"]
        help_texts = {"name": "The domain whose MX points at this gateway, e.g. example.org",
                      "active": "An inactive domain is refused at RCPT like a foreign one"}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["route"].required = False
        self.fields["route"].help_text = "Where this domain's mail is delivered"
        self.order_fields(["name", "route", "new_route", "active", "recipient_check", "valid_recipients"])
        if self.instance.pk:
            self.initial["valid_recipients"] = "\n".join(
                self.instance.valid_recipients.order_by("address").values_list("address", flat=True))

    def clean_name(self) -> str:
        name = self.cleaned_data["name"].strip().rstrip(".").lower()
        validate_domain_name(name)
        if Domain.objects.filter(name=name).exclude(pk=self.instance.pk).exists():
            raise ValidationError(f"{name} is already a protected domain.")
        return name

    def clean_new_route(self) -> tuple[str, int] | None:
        value = self.cleaned_data["new_route"].strip()
        if not value:
            return None
        try:
            host, port = parse_host_port(value, default_port=25)
            validate_host(host)
        except (ValueError, ValidationError) as exc:
            message = exc.messages[0] if isinstance(exc, ValidationError) else str(exc)
            raise ValidationError(f"{message}. Write HOST:PORT, e.g. mail.example.org:25.") from None
        return host, port

    def clean(self) -> dict:
        data = super().clean()
        route, new_route = data.get("route"), data.get("new_route")
        if route and new_route:
            self.add_error("new_route", "Choose an existing route or enter a new one, not both.")
        elif not route and not new_route and "new_route" not in self.errors:
            self.add_error("route", "Every domain needs a route: choose one, or enter HOST:PORT below.")
        name = data.get("name")
        addresses = split_lines(data.get("valid_recipients", ""))
        bad, foreign = [], []
        for address in addresses:
            try:
                validate_email(address)
            except ValidationError:
                bad.append(address)
                continue
            if name and address_domain(address) != name:
                foreign.append(address)
        if bad:
            self.add_error("valid_recipients", f"Not an e-mail address: {', '.join(bad)}.")
        if foreign:
            self.add_error("valid_recipients", f"Not at {name}: {', '.join(foreign)}.")
        taken = ValidRecipient.objects.filter(address__in=addresses).exclude(domain_id=self.instance.pk)
        if taken.exists():
            self.add_error("valid_recipients", "Already listed for another domain: "
                           + ", ".join(taken.values_list("address", flat=True)))
        if data.get("recipient_check") == Domain.RecipientCheck.LIST and not addresses and not bad:
            self.add_error("valid_recipients", "With the check 'Only the listed addresses', list at least one "
                                               "address, or every recipient is refused.")
        data["valid_recipients"] = addresses
        return data

    def save(self, commit: bool = True) -> Domain:
        new_route = self.cleaned_data.get("new_route")
        if new_route:
            self.instance.route = Route.for_address(f"[{new_route[0]}]:{new_route[1]}"
                                                    if ":" in new_route[0] else f"{new_route[0]}:{new_route[1]}")
        domain = super().save(commit=True)
        wanted = set(self.cleaned_data["valid_recipients"])
        current = set(domain.valid_recipients.values_list("address", flat=True))
        domain.valid_recipients.filter(address__in=current - wanted).delete()
        ValidRecipient.objects.bulk_create([ValidRecipient(domain=domain, address=a) for a in sorted(wanted - current)])
        return domain


# --- Mail flow and networks --------------------------------------------------------------------------


class MailFlowSettingsForm(forms.ModelForm):
    error_css_class = "has-error"

    class Meta:
        model = MailFlowSettings
        fields = "__all__"
        widgets = {"blocked_attachments": forms.Textarea(attrs={"rows": 8})}

    def clean_blocked_attachments(self) -> str:
        patterns = split_lines(self.cleaned_data["blocked_attachments"])
        spaced = [p for p in patterns if any(c.isspace() for c in p)]
        if spaced:
            raise ValidationError(f"One pattern per line, without spaces: {', '.join(spaced)}")
        return "\n".join(patterns)


class DomainSpamPolicyForm(forms.ModelForm):
    """A domain's spam policy: its thresholds and actions (empty: the mail-flow settings' own, named in the
    choices and help texts), and the limits of what its users may choose."""

    error_css_class = "has-error"

    class Meta:
        model = DomainSpamPolicy
        fields = ["spam_threshold", "high_spam_threshold", "action_spam", "action_high_spam", "users_may_choose",
                  "user_min_threshold", "user_max_threshold", "users_may_skip_quarantine"]
        labels = {"action_spam": "Action for spam", "action_high_spam": "Action for high spam",
                  "users_may_choose": "Users may choose their own thresholds",
                  "user_min_threshold": "Lowest threshold a user may choose",
                  "user_max_threshold": "Highest threshold a user may choose",
                  "users_may_skip_quarantine": "Users may opt out of the quarantine for spam (tagged instead)"}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        config = MailFlowSettings.cached()
        actions = dict(Action.choices)
        for name, current in (("action_spam", config.action_spam), ("action_high_spam", config.action_high_spam)):
            self.fields[name].choices = [("", f"As the mail-flow settings say ({actions[current].lower()})"),
                                         *Action.choices]
            self.fields[name].help_text = ""
        for name, current in (("spam_threshold", config.spam_threshold),
                              ("high_spam_threshold", config.high_spam_threshold)):
            self.fields[name].help_text += f" ({current:g})"


class TrustedNetworkForm(forms.ModelForm):
    error_css_class = "has-error"

    class Meta:
        model = TrustedNetwork
        fields = ["network", "description"]
        help_texts = {"network": "An IP address or a CIDR network, e.g. 192.0.2.0/24 or 2001:db8::/48: "
                                 "clients there may relay mail to any domain"}

    def clean_network(self) -> str:
        value = self.cleaned_data["network"].strip()
        try:
            network = ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ValidationError(f"{value!r} is not an IP address or a CIDR network (e.g. 192.0.2.0/24).") from None
        # A network this wide lets much of the internet relay through us: an open relay by another name.
        if network.prefixlen < (8 if network.version == 4 else 16):
            raise ValidationError(f"{network} is too wide: it would make this gateway an open relay. "
                                  "List your own networks only.")
        if TrustedNetwork.objects.filter(network=str(network)).exclude(pk=self.instance.pk).exists():
            raise ValidationError(f"{network} is already trusted.")
        return str(network)
