import json
import time

from django.core.management.base import BaseCommand, CommandError
from django.utils.dateparse import parse_datetime
from django.utils.timezone import is_naive, make_aware

from gateway.models import Message


def message_record(message: Message) -> dict:
    return {
        "id": message.queue_id,
        "received_at": message.received_at.isoformat(),
        "node": message.node,
        "direction": message.direction,
        "state": message.state,
        "client_ip": message.client_ip,
        "client_name": message.client_name,
        "helo": message.helo,
        "envelope_sender": message.envelope_sender,
        "recipients": [
            {"address": r.address, "status": r.status, "verdict": r.verdict, "action": r.action,
             "policy": r.policy, "reply": r.reply_text, "attempts": r.attempts}
            for r in message.recipients.all()
        ],
        "header_from": message.header_from,
        "subject": message.subject,
        "message_id": message.message_id,
        "size": message.size,
        "spam_score": message.spam_score,
        "spam_threshold": message.spam_threshold,
        "spam_rules": message.spam_rules,
        "virus_names": message.virus_names,
        "attachments": message.attachments,
        "verdict": message.verdict,
        "action": message.action,
        "quarantined": message.quarantined,
        "refusal_reason": message.refusal_reason,
        "smtp_reply": message.smtp_reply,
        "scan_notes": message.scan_notes,
        "checks": message.checks,
        "last_error": message.last_error,
    }


FINAL_STATES = frozenset({Message.State.DELIVERED, Message.State.BOUNCED, Message.State.PARTIAL, Message.State.REFUSED,
                          Message.State.DELETED})
# Messages whose state --follow watches for a change, at most: the newest are kept.
FOLLOWED_AT_MOST = 10_000


class Command(BaseCommand):
    help = ("Print the mail log, one JSON object per message (oldest first); with --follow, go on printing each "
            "new message and each change of a message's state, from every node, as `tail -f` does.")

    def add_arguments(self, parser):
        parser.add_argument("--json", action="store_true", help="JSON lines (the only format for now)")
        parser.add_argument("--since", help="ISO date-time: only messages received at or after it")
        parser.add_argument("--node", help="only the messages this node (NODE_NAME) received")
        parser.add_argument("--follow", "-f", action="store_true",
                            help="keep going: print new messages and state changes as they are logged")
        parser.add_argument("--interval", type=float, default=1.0, help="seconds between looks with --follow")

    def handle(self, *args, since: str | None, node: str | None, follow: bool, interval: float, **options):
        if interval <= 0:
            raise CommandError("--interval: a number of seconds above 0")
        messages = Message.objects.order_by("id").prefetch_related("recipients")
        if since:
            when = parse_datetime(since) or parse_datetime(f"{since}T00:00:00")
            if when is None:
                raise CommandError(f"--since: not an ISO date-time: {since}")
            messages = messages.filter(received_at__gte=make_aware(when) if is_naive(when) else when)
        if node:
            messages = messages.filter(node=node)
        if not follow:
            for message in messages.order_by("received_at", "id").iterator(chunk_size=500):
                self._write(message)
            return
        watched: dict[int, str] = {}  # id -> state last printed, of the messages not yet final
        last_id = 0
        try:
            while True:
                last_id = self._new(messages, last_id, watched)
                self._changed(messages, watched)
                time.sleep(interval)
        except KeyboardInterrupt:
            return

    def _write(self, message: Message) -> None:
        self.stdout.write(json.dumps(message_record(message), ensure_ascii=False))
        self.stdout.flush()

    def _new(self, messages, last_id: int, watched: dict[int, str]) -> int:
        # By id, not by time: ids only grow, whichever node wrote the row, and each row is printed once.
        for message in messages.filter(id__gt=last_id).iterator(chunk_size=500):
            self._write(message)
            last_id = message.pk
            if message.state not in FINAL_STATES:
                watched[message.pk] = message.state
        while len(watched) > FOLLOWED_AT_MOST:
            del watched[min(watched)]
        return last_id

    def _changed(self, messages, watched: dict[int, str]) -> None:
        if not watched:
            return
        ids = list(watched)
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            seen = set()
            for message in messages.filter(id__in=chunk).iterator(chunk_size=500):
                seen.add(message.pk)
                if message.state != watched[message.pk]:
                    self._write(message)
                    watched[message.pk] = message.state
                if message.state in FINAL_STATES:
                    watched.pop(message.pk, None)
            for gone in set(chunk) - seen:  # purged meanwhile
                watched.pop(gone, None)
