"""`manage.py digests send [--user NAME | --address ADDR] [--dry-run] [--due]`: the quarantine digests now."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from digests.send import send_all


class Command(BaseCommand):
    help = ("Send the quarantine digests: each receiver with newly quarantined mail gets one, of what is new since "
            "their last. --due: only those whose hour has come (what beat runs).")

    def add_arguments(self, parser) -> None:
        sub = parser.add_subparsers(dest="command", required=True)
        send = sub.add_parser("send", help="send the digests of what is new")
        who = send.add_mutually_exclusive_group()
        who.add_argument("--user", help="only this login's digests (its own mail; a domain administrator's domains)")
        who.add_argument("--address", help="only the digest of this address")
        send.add_argument("--dry-run", action="store_true", help="say what would be sent; send nothing")
        send.add_argument("--due", action="store_true", help="only the digests whose time has come")

    def handle(self, *args, **options) -> None:
        address = options["address"].strip().lower() if options.get("address") else None
        sent, idle = send_all(username=options.get("user"), address=address, dry_run=options["dry_run"],
                              due_only=options["due"])
        if not sent and not idle and (options.get("user") or address):
            raise CommandError(f"no digest receiver {options.get('user') or address}: not an active login with "
                               "addresses, nor an address with held mail in a domain whose addresses get digests")
        for outcome in sent:
            if outcome.message is None:
                self.stdout.write(f"would send {outcome.receiver.label} a digest of {outcome.count} messages")
            else:
                self.stdout.write(f"sent {outcome.receiver.label} a digest of {outcome.count} messages "
                                  f"(queued as {outcome.message.queue_id})")
        for receiver in idle:
            state = "digests off" if receiver.frequency == "off" else "nothing new"
            self.stdout.write(f"{receiver.label}: {state}")
        self.stdout.write(f"{len(sent)} digest{'s' if len(sent) != 1 else ''} "
                          f"{'would be sent' if options['dry_run'] else 'sent'}, {len(idle)} with nothing to send")
