import json

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.forms.models import model_to_dict

from gateway.models import CheckAction, DNSBLZone, GreylistEntry, SMTPPolicy
from gateway.policy import greylist


class Command(BaseCommand):
    help = ("The SMTP-time checks (docs/smtp-policy.md): show them, set an action or a value, manage the "
            "DNSBL zones, purge or pre-pass greylisting triplets. For scripts; the admin edits the same rows.")

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="command", required=True)
        sub.add_parser("show", help="print the policy and the DNSBL zones as JSON")
        set_ = sub.add_parser("set", help="set fields: e.g. spf_softfail_action=reject greylist_delay=120")
        set_.add_argument("assignments", nargs="+", metavar="FIELD=VALUE")
        add = sub.add_parser("dnsbl-add", help="add (or change) a DNSBL zone")
        add.add_argument("zone")
        add.add_argument("--action", choices=[c for c, _ in CheckAction.choices], default=CheckAction.REJECT)
        add.add_argument("--score", type=float, default=3.0)
        add.add_argument("--answers", default="", help="addresses/networks meaning 'listed'")
        add.add_argument("--disabled", action="store_true")
        remove = sub.add_parser("dnsbl-remove", help="remove a DNSBL zone")
        remove.add_argument("zone")
        passed = sub.add_parser("greylist-pass", help="let a triplet pass greylisting from now on")
        passed.add_argument("client_ip")
        passed.add_argument("sender", help="envelope sender ('' for the null sender)")
        passed.add_argument("recipient")
        sub.add_parser("greylist-purge", help="forget expired greylisting triplets")

    def handle(self, *args, command: str, **options):
        getattr(self, "do_" + command.replace("-", "_"))(**options)

    def do_show(self, **_):
        policy = model_to_dict(SMTPPolicy.load())
        policy.pop("id", None)
        zones = [{"zone": z.zone, "enabled": z.enabled, "action": z.action, "score": z.score, "answers": z.answers}
                 for z in DNSBLZone.objects.all()]
        self.stdout.write(json.dumps({"policy": policy, "dnsbl_zones": zones}, indent=2))

    def do_set(self, assignments: list[str], **_):
        policy = SMTPPolicy.load()
        names = {f.name for f in SMTPPolicy._meta.get_fields()} - {"id"}
        for item in assignments:
            name, sep, value = item.partition("=")
            if not sep or name not in names:
                raise CommandError(f"{item!r}: expected FIELD=VALUE with FIELD one of {', '.join(sorted(names))}")
            field = SMTPPolicy._meta.get_field(name)
            try:
                setattr(policy, name, field.to_python(value))
            except ValidationError as exc:
                raise CommandError(f"{name}: {'; '.join(exc.messages)}") from exc
        try:
            policy.full_clean()
        except ValidationError as exc:
            raise CommandError("; ".join(f"{k}: {' '.join(v)}" for k, v in exc.message_dict.items())) from exc
        policy.save()
        self.stdout.write("saved (the SMTP servers apply it within SMTP_POLICY_TTL seconds)")

    def do_dnsbl_add(self, zone: str, action: str, score: float, answers: str, disabled: bool, **_):
        entry = DNSBLZone.objects.filter(zone=zone.strip().rstrip(".").lower()).first() or DNSBLZone(zone=zone)
        entry.action, entry.score, entry.answers, entry.enabled = action, score, answers, not disabled
        try:
            entry.full_clean(validate_unique=False)
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages)) from exc
        entry.save()
        self.stdout.write(f"{entry.zone}: {entry.action}{'' if entry.enabled else ' (disabled)'}")

    def do_dnsbl_remove(self, zone: str, **_):
        deleted, _ = DNSBLZone.objects.filter(zone=zone.strip().rstrip(".").lower()).delete()
        if not deleted:
            raise CommandError(f"{zone} is not a DNSBL zone here")
        self.stdout.write(f"{zone} removed")

    def do_greylist_pass(self, client_ip: str, sender: str, recipient: str, **_):
        from django.utils import timezone

        policy = SMTPPolicy.load()
        try:
            network = greylist.client_network(client_ip, policy.greylist_ipv4_prefix, policy.greylist_ipv6_prefix)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        now = timezone.now()
        GreylistEntry.objects.update_or_create(
            key=greylist.triplet_key(network, sender, recipient),
            defaults={"client_network": network, "sender": sender.lower(), "recipient": recipient.lower(),
                      "first_seen": now, "last_seen": now, "passed_at": now})
        self.stdout.write(f"{network} <{sender}> -> <{recipient}> passes")

    def do_greylist_purge(self, **_):
        policy = SMTPPolicy.load()
        removed = greylist.purge(retry_window_hours=policy.greylist_retry_window_hours,
                                 lifetime_days=policy.greylist_lifetime_days)
        self.stdout.write(f"{removed} triplet(s) forgotten")
