"""`manage.py directory`: the organisation's directories from the command line.

    directory list                                   the directories, in the order logins try them
    directory test NAME [--login L] [--password-stdin] [--address A]
                                                     the connection, what a login finds, the recipient check
    directory sync [NAME ...] [--format text|json|csv] [--disable-missing]
                                                     what each LDAP directory holds, kept for the directory page
"""

from __future__ import annotations

import csv
import json
import sys

from django.core.management.base import BaseCommand, CommandError

from gateway.directory import ldap as directory_ldap
from gateway.directory.sync import check, sync
from gateway.models import Directory


class Command(BaseCommand):
    help = "The organisation's directories (LDAP, Active Directory, IMAP): list, test a configuration, sync."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        sub.add_parser("list", help="the directories, in the order logins try them")
        test = sub.add_parser("test", help="test a directory's configuration; nothing is written")
        test.add_argument("name")
        test.add_argument("--login", default="", help="what a person types to log in")
        test.add_argument("--password-stdin", action="store_true",
                          help="read the login's password from standard input (IMAP servers need one)")
        test.add_argument("--address", default="", help="an address for the recipient check")
        sync_parser = sub.add_parser("sync", help="list what the LDAP directories hold")
        sync_parser.add_argument("names", nargs="*", help="directories by name (default: every active LDAP one)")
        sync_parser.add_argument("--format", choices=["text", "json", "csv"], default="text")
        sync_parser.add_argument("--disable-missing", action="store_true",
                                 help="disable the accounts of people the directory no longer holds")

    def handle(self, *args, action: str, **options):
        getattr(self, f"do_{action}")(**options)

    def do_list(self, **_):
        for d in Directory.objects.select_related("domain"):
            state = "" if d.active else " (inactive)"
            self.stdout.write(f"{d.name}\t{d.get_kind_display()}\t{d.domain.name if d.domain else '(every domain)'}"
                              f"\t{d.uri}{state}")

    def do_test(self, name: str, login: str, password_stdin: bool, address: str, **_):
        directory = _named(name)
        password = sys.stdin.readline().rstrip("\n") if password_stdin else ""
        lines = check(directory, login=login, password=password, address=address)
        for line in lines:
            self.stdout.write(f"{'ok  ' if line.ok else 'FAIL'} {line.what}")
        if not all(line.ok for line in lines):
            raise CommandError(f"{directory.name}: not everything works")

    def do_sync(self, names: list[str], format: str, disable_missing: bool, **_):
        directories = [_named(n) for n in names] if names else list(
            Directory.objects.filter(active=True, kind=Directory.Kind.LDAP))
        if not directories:
            raise CommandError("no active LDAP directory")
        results = []
        failed = []
        for directory in directories:
            try:
                results.append(sync(directory, disable_missing=disable_missing))
            except (directory_ldap.Unreachable, ValueError) as exc:
                failed.append(f"{directory.name}: {exc}")
        rows = [{"directory": r.directory, "address": a, "primary": p, "name": n, "dn": dn}
                for r in results for a, p, n, dn in r.addresses]
        if format == "json":
            self.stdout.write(json.dumps(rows, indent=1, ensure_ascii=False))
        elif format == "csv":
            writer = csv.DictWriter(self.stdout, fieldnames=["directory", "address", "primary", "name", "dn"])
            writer.writeheader()
            writer.writerows(rows)
        else:
            for row in rows:
                alias = "" if row["address"] == row["primary"] else f"\t(alias of {row['primary']})"
                self.stdout.write(f"{row['address']}\t{row['name']}{alias}")
        for r in results:  # on standard error: standard output is the listing, for scripts
            self.stderr.write(f"{r.directory}: {r.entries} entries, {len(r.addresses)} addresses "
                              f"({r.added} new, {r.removed} gone) in {r.seconds} s"
                              + (f"; disabled: {', '.join(r.disabled)}" if r.disabled else ""))
        if failed:
            raise CommandError("; ".join(failed))


def _named(name: str) -> Directory:
    directory = Directory.objects.filter(name=name).first()
    if directory is None:
        raise CommandError(f"no directory named {name!r} (manage.py directory list)")
    return directory
