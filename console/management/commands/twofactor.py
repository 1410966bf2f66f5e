"""`manage.py twofactor`: whether a login has two-factor login set up, and turning it off for one who lost their
phone and their recovery codes (audited, as the machine's administrator)."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from console import twofactor
from gateway.models import record_audit


class Command(BaseCommand):
    help = "Show a login's two-factor login, or turn it off (its authenticator and recovery codes are deleted)."

    def add_arguments(self, parser):
        parser.add_argument("action", choices=["show", "reset"])
        parser.add_argument("--user", dest="username", required=True, help="the username")

    def handle(self, *args, action: str, username: str, **options):
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"no login {username!r}")
        device = twofactor.confirmed_device(user)
        if action == "show":
            if device is None:
                self.stdout.write(f"{username}: two-factor login is off")
            else:
                self.stdout.write(f"{username}: two-factor login is on, "
                                  f"{twofactor.recovery_codes_left(user)} recovery codes left")
            return
        twofactor.remove(user)
        record_audit("two_factor_disable", target=username, by="manage.py twofactor reset")
        self.stdout.write(f"{username}: two-factor login is off; they log in with their password and may set it up "
                          "again on My account")
