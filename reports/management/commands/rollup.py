"""python manage.py rollup [--all]: bring the report roll-ups up to date (what beat does every minute)."""

from __future__ import annotations

import time

from django.core.management.base import BaseCommand

from reports.rollup import refresh


class Command(BaseCommand):
    help = "Recompute the report roll-ups of the days that changed (--all: rebuild every day from the log)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--all", action="store_true",
                            help="Rebuild all roll-ups (after adding a domain, or to repair them)")

    def handle(self, *args, **options) -> None:
        started = time.monotonic()
        days = refresh(force_all=options["all"])
        self.stdout.write(f"{days} day(s) recomputed in {time.monotonic() - started:.1f} s")
