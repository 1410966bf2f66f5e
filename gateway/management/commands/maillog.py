import json

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
             "reply": r.reply_text, "attempts": r.attempts}
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


class Command(BaseCommand):
    help = "Print the mail log, one JSON object per message (oldest first)."

    def add_arguments(self, parser):
        parser.add_argument("--json", action="store_true", help="JSON lines (the only format for now)")
        parser.add_argument("--since", help="ISO date-time: only messages received at or after it")

    def handle(self, *args, since: str | None, **options):
        messages = Message.objects.order_by("received_at", "id").prefetch_related("recipients")
        if since:
            when = parse_datetime(since) or parse_datetime(f"{since}T00:00:00")
            if when is None:
                raise CommandError(f"--since: not an ISO date-time: {since}")
            messages = messages.filter(received_at__gte=make_aware(when) if is_naive(when) else when)
        for message in messages.iterator(chunk_size=500):
            self.stdout.write(json.dumps(message_record(message), ensure_ascii=False))
