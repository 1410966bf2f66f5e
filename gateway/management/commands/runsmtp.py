import asyncio
import logging

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from appliance.scheduling import schedule_mail_path
from gateway.models import parse_host_port
from gateway.smtp.serve import serve


class Command(BaseCommand):
    help = "Run the SMTP server: receive mail, enforce the policy, store it and enqueue its scan."

    def add_arguments(self, parser):
        parser.add_argument("--listen", default=settings.SMTP_LISTEN, help="HOST:PORT (default %(default)s)")
        parser.add_argument("--submission", default=settings.SMTP_SUBMISSION_LISTEN,
                            help="HOST:PORT of the submission port (587: STARTTLS, then AUTH); default: "
                                 "SMTP_SUBMISSION_LISTEN, empty for none")
        parser.add_argument("--smtps", default=settings.SMTP_SMTPS_LISTEN,
                            help="HOST:PORT of submission over implicit TLS (465, AUTH); default: "
                                 "SMTP_SMTPS_LISTEN, empty for none")
        parser.add_argument("--uvloop", action="store_true", help="Use uvloop's event loop if installed")

    @staticmethod
    def _address(option: str, value: str, default_port: int) -> tuple[str, int] | None:
        if not value:
            return None
        try:
            return parse_host_port(value, default_port=default_port)
        except ValueError as exc:
            raise CommandError(f"{option}: {exc}") from exc

    def handle(self, *args, listen: str, submission: str, smtps: str, uvloop: bool, **options):
        host, port = self._address("--listen", listen, 25)
        submission_address = self._address("--submission", submission, 587)
        smtps_address = self._address("--smtps", smtps, 465)
        logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs every line at INFO
        schedule_mail_path("runsmtp")  # before the event loop and its threads exist: they inherit it
        if uvloop:
            try:
                import uvloop as uv

                uv.install()
            except ImportError:
                self.stderr.write("uvloop is not installed; using asyncio's own event loop")
        try:
            asyncio.run(serve(host, port, submission=submission_address, smtps=smtps_address))
        except OSError as exc:
            raise CommandError(f"cannot listen: {exc}") from exc
        except RuntimeError as exc:
            raise CommandError(str(exc)) from exc
