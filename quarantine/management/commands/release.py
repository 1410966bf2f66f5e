from django.core.exceptions import PermissionDenied, ValidationError
from django.core.management.base import BaseCommand, CommandError

from gateway.models import Message
from quarantine.actions import release_message


class Command(BaseCommand):
    help = "Release a quarantined message: deliver the stored original without scanning it again."

    def add_arguments(self, parser):
        parser.add_argument("queue_id")
        parser.add_argument("--to", action="append", dest="recipients", help="only this original recipient "
                            "(repeatable)")
        parser.add_argument("--to-address", help="deliver to this address instead")

    def handle(self, *args, queue_id: str, recipients, to_address, **options):
        message = Message.objects.filter(queue_id=queue_id.upper()).first()
        if message is None:
            raise CommandError(f"no message {queue_id}")
        try:
            released = release_message(message, by=None, recipients=recipients, to_address=to_address)
        except (ValidationError, PermissionDenied) as exc:
            raise CommandError("; ".join(getattr(exc, "messages", [str(exc)]))) from exc
        if not released:
            raise CommandError(f"{message.queue_id} is not in quarantine (state: {message.state})")
        self.stdout.write(f"{message.queue_id} released")
