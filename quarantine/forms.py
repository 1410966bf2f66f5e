"""Forms of the quarantine pages: the filter, the release options, the allow and block lists, bulk actions.
Who may do what is decided in quarantine.selection and gateway.access; these forms offer only that."""

from __future__ import annotations

from django import forms
from django.core.exceptions import ValidationError
from django.db.models import QuerySet

from gateway.access import Role, address_domain, domains_of, may_release_to, role_of
from gateway.models import Domain, Message, Recipient, SenderListEntry, Verdict, validate_sender_pattern

from .actions import release_address
from .models import BulkJob
from .selection import (
    MAX_ADDRESS,
    MAX_SUBJECT,
    QuarantineFilter,
    held_recipients_for,
    list_domains_for,
    list_scopes_for,
)

# --- The quarantine filter -----------------------------------------------------------------------------


class QuarantineFilterForm(forms.Form):
    """What the quarantine list and a bulk action on 'all that match' select. Empty fields select all."""

    verdict = forms.ChoiceField(choices=[("", "Any verdict"), *Verdict.choices], required=False)
    sender = forms.CharField(required=False, max_length=MAX_ADDRESS,
                             widget=forms.TextInput(attrs={"placeholder": "sender contains"}))
    recipient = forms.CharField(required=False, max_length=MAX_ADDRESS,
                                widget=forms.TextInput(attrs={"placeholder": "recipient contains"}))
    subject = forms.CharField(required=False, max_length=MAX_SUBJECT,
                              widget=forms.TextInput(attrs={"placeholder": "subject contains"}))
    date_from = forms.DateField(required=False, label="From", widget=forms.DateInput(attrs={"type": "date"}))
    date_to = forms.DateField(required=False, label="To", widget=forms.DateInput(attrs={"type": "date"}),
                              help_text="inclusive")

    FIELDS = ("verdict", "sender", "recipient", "subject", "date_from", "date_to")

    def clean(self) -> dict:
        data = super().clean()
        if data.get("date_from") and data.get("date_to") and data["date_from"] > data["date_to"]:
            self.add_error("date_to", "The end date is before the start date.")
        return data

    def selection(self) -> QuarantineFilter:
        data = self.cleaned_data
        return QuarantineFilter(verdict=data.get("verdict") or "", sender=data.get("sender") or "",
                                recipient=data.get("recipient") or "", subject=data.get("subject") or "",
                                date_from=data.get("date_from"), date_to=data.get("date_to"))

    def apply(self, qs: QuerySet[Message]) -> QuerySet[Message]:
        return self.selection().apply(qs)

    def as_query(self) -> dict[str, str]:
        """The filter as plain strings: stored with a bulk job, put back into links."""
        if not self.is_bound or not self.is_valid():
            return {}
        return self.selection().as_query()


# --- Release options -----------------------------------------------------------------------------------


class ReleaseForm(forms.Form):
    """Release to the original recipients (all of one's own, or some of them), or to another address."""

    recipients = forms.MultipleChoiceField(required=False, widget=forms.CheckboxSelectMultiple,
                                           help_text="Leave all unticked to release to every recipient listed")
    to_address = forms.CharField(required=False, max_length=320, label="…or to another address",
                                 help_text="Instead of the original recipients")

    def __init__(self, *args, message: Message, user, **kwargs):
        super().__init__(*args, **kwargs)
        self.message, self.user = message, user
        self.allowed = held_recipients_for(message, user)
        self.fields["recipients"].choices = [(a, a) for a in self.allowed]
        role = role_of(user)
        if role == Role.USER:
            self.fields["to_address"].help_text = "One of your own addresses"
        elif role == Role.DOMAIN_ADMIN:
            self.fields["to_address"].help_text = "An address in one of your domains"

    def clean_to_address(self) -> str | None:
        value = self.cleaned_data["to_address"].strip()
        if not value:
            return None
        # The SMTP server's own parser first: an address it would refuse at RCPT (a relay through the local
        # part, a quoted @, a source route, an address literal) is not released to either.
        try:
            address = release_address(value)
        except ValidationError as exc:
            raise ValidationError(f"{value!r} is not an e-mail address this gateway delivers to: "
                                  f"{exc.messages[0]}.") from None
        if not may_release_to(self.user, address):
            raise ValidationError(f"You may not release mail to {address}: "
                                  + self.fields["to_address"].help_text.lower() + " only.")
        return address

    def clean(self) -> dict:
        data = super().clean()
        if data.get("to_address") and data.get("recipients"):
            self.add_error("to_address", "Release to the chosen recipients or to another address, not both.")
        if not self.allowed:
            # To another address too: only for the copies one holds, whatever the address.
            raise ValidationError("None of this message's held recipients is yours: you may not release it.")
        return data

    def release_arguments(self) -> dict:
        """The keyword arguments for quarantine.actions.release_message."""
        data = self.cleaned_data
        if data.get("to_address"):
            return {"to_address": data["to_address"]}
        chosen = data.get("recipients") or self.allowed
        everyone = set(self.message.recipients.filter(status=Recipient.Status.QUARANTINED)
                       .values_list("address", flat=True))
        # None means "the original recipients": the action's own default when all of them are chosen.
        return {"recipients": None if set(chosen) == everyone else list(chosen)}


# --- Allow and block lists -----------------------------------------------------------------------------


class ListEntryForm(forms.Form):
    kind = forms.ChoiceField(choices=SenderListEntry.Kind.choices, initial=SenderListEntry.Kind.BLOCK,
                             widget=forms.RadioSelect, label="List")
    sender = forms.CharField(
        max_length=320,
        help_text="An address (john@example.com), a whole domain (@example.com), its subdomains (*.example.com), "
                  "an IP address (192.0.2.7) or a network (192.0.2.0/24)")
    scope = forms.ChoiceField(label="For")
    domain = forms.ModelChoiceField(queryset=Domain.objects.none(), required=False,
                                    help_text="When the entry is for a domain")
    comment = forms.CharField(max_length=200, required=False)

    def __init__(self, *args, user, **kwargs):
        super().__init__(*args, **kwargs)
        self.user = user
        scopes = list_scopes_for(user)
        self.fields["scope"].choices = scopes
        self.fields["scope"].initial = scopes[0][0] if scopes else None
        self.fields["domain"].queryset = list_domains_for(user)
        if len(scopes) == 1:
            # A user has one list, their own: no choice to make.
            self.fields["scope"].widget = forms.HiddenInput()
            self.fields["scope"].required = False
            del self.fields["domain"]

    def clean_scope(self) -> str:
        # Omitted means the only scope on offer (a user's own list); anything else must be one on offer.
        return self.cleaned_data.get("scope") or self.fields["scope"].initial

    def clean_sender(self) -> str:
        sender = self.cleaned_data["sender"].strip().lower()
        try:
            validate_sender_pattern(sender)
        except ValidationError as exc:
            raise ValidationError(f"{exc.messages[0]}. Write an address (john@example.com), @example.com for a "
                                  "domain, *.example.com for its subdomains, or an IP address or network.") from None
        if sender.startswith("*@"):
            raise ValidationError("Write @example.com for a whole domain, not *@example.com.")
        return sender

    def clean(self) -> dict:
        data = super().clean()
        scope = data.get("scope")
        if scope == SenderListEntry.Scope.DOMAIN:
            if not data.get("domain"):
                self.add_error("domain" if "domain" in self.fields else "scope", "Choose the domain.")
        else:
            data["domain"] = None
        if "sender" in data and "kind" in data and scope:
            same_place = SenderListEntry.objects.filter(
                scope=scope, sender=data["sender"], domain=data.get("domain"),
                user=self.user if scope == SenderListEntry.Scope.USER else None)
            if same_place.filter(kind=data["kind"]).exists():
                self.add_error("sender", f"{data['sender']} is already on this list.")
            elif same_place.exists():
                self.add_error("sender", f"{data['sender']} is on the other list of the same scope; remove it "
                                         "there first.")
        return data

    def save(self) -> SenderListEntry:
        data = self.cleaned_data
        scope = data["scope"]
        return SenderListEntry.objects.create(
            kind=data["kind"], scope=scope, sender=data["sender"], domain=data.get("domain"),
            user=self.user if scope == SenderListEntry.Scope.USER else None, comment=data.get("comment", ""),
            created_by=self.user)


class SenderFromMessageForm(ListEntryForm):
    """Allow or block the sender of a quarantined message: the address or its whole domain."""

    what = forms.ChoiceField(choices=[("address", "This address"), ("domain", "Its whole domain")],
                             initial="address", widget=forms.RadioSelect, label="Sender")

    def __init__(self, data=None, *, user, message: Message, kind: str, prefix: str | None = None):
        self.message = message
        if data is not None:
            data = data.copy()
        super().__init__(data, user=user, prefix=prefix or kind)
        if data is not None:
            # The pattern comes from the message, never from the form: one cannot list an arbitrary sender here.
            data[self.add_prefix("sender")] = self.pattern_for(message, data.get(self.add_prefix("what"), "address"))
            data[self.add_prefix("kind")] = kind
        self.initial.update(kind=kind, sender=self.pattern_for(message, "address"))
        self.fields["sender"].widget = forms.HiddenInput()
        self.fields["sender"].required = False  # a bounce has no sender: clean_sender says so in words
        self.fields["kind"].widget = forms.HiddenInput()
        address, domain = self.pattern_for(message, "address"), self.pattern_for(message, "domain")
        if address:
            self.fields["what"].choices = [("address", f"This address ({address})"),
                                           ("domain", f"Its whole domain ({domain})")]
        self.order_fields(["what", "scope", "domain", "comment"])
        if "domain" in self.fields and role_of(self.user) == Role.DOMAIN_ADMIN:
            # Default to the domain the message was addressed to, when it is one of theirs.
            mine = set(domains_of(self.user))
            for domain in message.recipients.values_list("domain", flat=True):
                if domain in mine:
                    self.fields["domain"].initial = Domain.objects.filter(name=domain).first()
                    break

    @staticmethod
    def pattern_for(message: Message, what: str) -> str:
        sender = message.envelope_sender.strip().lower()
        if "@" not in sender:
            return ""
        return "@" + address_domain(sender) if what == "domain" else sender

    def clean_sender(self) -> str:
        if not self.cleaned_data.get("sender"):
            raise ValidationError("This message has no sender address (a bounce): there is nothing to list.")
        return super().clean_sender()


class BulkForm(forms.Form):
    """A bulk action on the ticked messages, or on every message the current filter matches."""

    action = forms.ChoiceField(choices=BulkJob.Action.choices)
    target = forms.ChoiceField(choices=[("selected", "The ticked messages"), ("all", "All that match the filter")],
                               initial="selected")
    ids = forms.MultipleChoiceField(required=False)  # queue ids; checked against the user's scope, not trusted

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Any string is accepted here: the scope check is the lookup through quarantine_of(), not a choice list.
        self.fields["ids"].valid_value = lambda value: len(value) <= 20

    def clean(self) -> dict:
        data = super().clean()
        if data.get("target") == "selected" and not data.get("ids"):
            raise ValidationError("Tick the messages first, or choose 'All that match the filter'.")
        return data
