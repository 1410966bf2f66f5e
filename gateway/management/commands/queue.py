"""`manage.py queue`: the mail queue from the shell, in the spirit of mailq, postqueue -f and postsuper.

    manage.py queue list [--json] [--state STATE] [--route HOST] [--node NODE]
    manage.py queue retry|bounce|delete|hold|release-hold QUEUEID... | --all-deferred | --route HOST

The command line is the machine's administrator: it acts for every recipient (audited as the system).
"""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from gateway.mailqueue import actions
from gateway.mailqueue.listing import Destinations, QueueState, queued


def _when(value) -> str | None:
    return value.isoformat() if value else None


class Command(BaseCommand):
    help = "The mail queue: list what is not yet delivered; retry, bounce, delete, hold or release it."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        listing = sub.add_parser("list", help="every recipient not yet final (mailq)")
        listing.add_argument("--json", action="store_true", help="one JSON document, for scripts")
        listing.add_argument("--state", choices=QueueState.ALL)
        listing.add_argument("--route", metavar="HOST", help="a route's name, host or HOST:PORT")
        listing.add_argument("--node", help="messages received on this node")
        for name in actions.ACTIONS:
            act = sub.add_parser(name, help=f"{name} the given queue IDs, every deferred recipient, or a route's")
            act.add_argument("queue_ids", nargs="*", metavar="QUEUEID")
            act.add_argument("--all-deferred", action="store_true", help="every deferred recipient")
            act.add_argument("--route", metavar="HOST", help="every queued recipient of a route")

    def handle(self, *args, action: str, **options):
        if action == "list":
            return self.do_list(**options)
        return self.do_act(action, **options)

    def do_list(self, *, json: bool, state: str | None, route: str | None, node: str | None, **_):
        recipients = queued()
        if state:
            recipients = recipients.filter(queue_state=state)
        destinations = Destinations.read()
        if route:
            recipients = destinations.filter(recipients, route)
        if node:
            recipients = recipients.filter(message__node=node)
        rows = recipients.select_related("message").order_by("message__received_at", "id")
        now = timezone.now()
        entries = [{
            "queue_id": r.message.queue_id, "recipient": r.address, "sender": r.message.envelope_sender,
            "state": r.queue_state, "destination": destinations.of(r.domain), "node": r.message.node,
            "received_at": _when(r.message.received_at), "age_seconds": int((now - r.message.received_at)
                                                                            .total_seconds()),
            "attempts": r.attempts, "next_attempt_at": _when(r.message.next_attempt_at if r.queue_state in (
                QueueState.SCAN, QueueState.SCAN_DEFERRED) else r.next_attempt_at),
            "last_reply": r.last_reply, "size": r.message.size,
        } for r in rows.iterator(chunk_size=2000)]
        if json:
            self.stdout.write(_dumps({"count": len(entries), "entries": entries}))
            return
        if not entries:
            self.stdout.write("Mail queue is empty")
            return
        for entry in entries:
            self.stdout.write(
                f"{entry['queue_id']:<14}{entry['state']:<15}{entry['received_at'][:19]}  "
                f"<{entry['sender']}> -> <{entry['recipient']}>  via {entry['destination']}"
                + (f"\n{'':14}({entry['last_reply']})" if entry["last_reply"] else ""))
        self.stdout.write(f"-- {len(entries)} recipient(s) in the queue")

    def do_act(self, action: str, *, queue_ids: list[str], all_deferred: bool, route: str | None, **_):
        if bool(queue_ids) + all_deferred + bool(route) != 1:
            raise CommandError("give QUEUEID..., --all-deferred or --route HOST (one of them)")
        recipients = queued()
        if queue_ids:
            wanted = {q.strip().upper() for q in queue_ids}
            recipients = recipients.filter(message__queue_id__in=wanted)
            found = set(recipients.values_list("message__queue_id", flat=True))
            missing = wanted - found
            if missing:
                raise CommandError(f"not in the queue: {', '.join(sorted(missing))}")
        elif all_deferred:
            recipients = recipients.filter(queue_state__in=(QueueState.DEFERRED, QueueState.SCAN_DEFERRED))
        else:
            recipients = Destinations.read().filter(recipients, route)
            if not recipients.exists():
                raise CommandError(f"nothing in the queue goes to {route}")
        outcome = actions.act(action, recipients)
        self.stdout.write(outcome.summary())


def _dumps(value) -> str:
    return json.dumps(value, indent=2)
