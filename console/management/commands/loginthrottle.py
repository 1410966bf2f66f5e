"""`manage.py loginthrottle`: look at and clear the login throttle's counts (gateway.throttle), for a user locked
out by someone else's guessing."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from gateway import throttle

WHAT = {"pair": "this username from this address", "username": "this username from anywhere",
        "ip": "any username from this address"}


class Command(BaseCommand):
    help = "Show the login throttle's counts of failures for a username and/or an address, or clear them."

    def add_arguments(self, parser):
        parser.add_argument("action", choices=["show", "clear"])
        parser.add_argument("--user", dest="username", help="the username")
        parser.add_argument("--ip", help="the client address (IPv6: any address of its /64)")

    def handle(self, *args, action: str, username: str | None, ip: str | None, **options):
        if not username and not ip:
            raise CommandError("say --user, --ip or both")
        if action == "clear":
            throttle.clear(username=username, ip=ip)
            self.stdout.write(f"cleared the counts of {' from '.join(filter(None, [username, ip]))}")
            return
        for scope, count in throttle.locks(username=username, ip=ip).items():
            limit = throttle.limit_of(scope)
            state = "LOCKED" if limit and count >= limit else "open"
            self.stdout.write(f"{WHAT[scope]}: {count} of {limit or 'no limit'} failures, {state}")
