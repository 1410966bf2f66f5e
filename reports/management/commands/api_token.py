"""python manage.py api_token create|list|revoke: the read-only API's tokens (docs/api.md)."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from reports.models import ApiToken


class Command(BaseCommand):
    help = "Create, list or revoke API tokens (sent as 'Authorization: Token <key>')."

    def add_arguments(self, parser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        create = sub.add_parser("create", help="Create a token for a user and print it (only this once)")
        create.add_argument("username")
        create.add_argument("--name", default="", help="What the token is for")
        listing = sub.add_parser("list", help="List tokens (their first characters only)")
        listing.add_argument("username", nargs="?")
        revoke = sub.add_parser("revoke", help="Delete a token by the first characters of its key")
        revoke.add_argument("prefix")

    def handle(self, *args, **options) -> None:
        action = options["action"]
        if action == "create":
            user = get_user_model().objects.filter(username=options["username"]).first()
            if user is None:
                raise CommandError(f"no user {options['username']!r}")
            _, key = ApiToken.create_for(user, options["name"])
            self.stdout.write(key)
        elif action == "list":
            tokens = ApiToken.objects.select_related("user")
            if options.get("username"):
                tokens = tokens.filter(user__username=options["username"])
            for token in tokens:
                used = token.last_used_at.isoformat() if token.last_used_at else "never"
                self.stdout.write(f"{token.prefix}…  {token.user.username}  {token.name or '-'}  "
                                  f"created {token.created_at:%Y-%m-%d}  last used {used}")
        else:
            matches = ApiToken.objects.filter(prefix=options["prefix"][:8])
            if matches.count() != 1:
                raise CommandError(f"{matches.count()} tokens start with {options['prefix']!r}; give the 8 first "
                                   "characters of exactly one")
            matches.delete()
            self.stdout.write("revoked")
