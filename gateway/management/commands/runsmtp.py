import asyncio
import logging

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from gateway.models import parse_host_port
from gateway.smtp.server import serve


class Command(BaseCommand):
    help = "Run the SMTP server: receive mail, enforce the policy, store it and enqueue its scan."

    def add_arguments(self, parser):
        parser.add_argument("--listen", default=settings.SMTP_LISTEN, help="HOST:PORT (default %(default)s)")
        parser.add_argument("--uvloop", action="store_true", help="Use uvloop's event loop if installed")

    def handle(self, *args, listen: str, uvloop: bool, **options):
        try:
            host, port = parse_host_port(listen, default_port=25)
        except ValueError as exc:
            raise CommandError(f"--listen: {exc}") from exc
        logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs every line at INFO
        if uvloop:
            try:
                import uvloop as uv

                uv.install()
            except ImportError:
                self.stderr.write("uvloop is not installed; using asyncio's own event loop")
        try:
            asyncio.run(serve(host, port))
        except OSError as exc:
            raise CommandError(f"cannot listen on {host}:{port}: {exc}") from exc
