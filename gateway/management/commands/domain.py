from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from gateway.models import Domain, Route, parse_host_port


class Command(BaseCommand):
    help = "Manage protected (relay) domains: add, list, remove."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        add = sub.add_parser("add", help="protect a domain and set its route")
        add.add_argument("name")
        add.add_argument("--route", required=True, help="HOST:PORT of the domain's mail server")
        add.add_argument("--recipient-check", choices=[c for c, _ in Domain.RecipientCheck.choices], default="any")
        sub.add_parser("list", help="list the protected domains")
        remove = sub.add_parser("remove", help="stop protecting a domain")
        remove.add_argument("name")

    def handle(self, *args, action: str, **options):
        getattr(self, f"do_{action}")(**options)

    @transaction.atomic
    def do_add(self, name: str, route: str, recipient_check: str, **_):
        try:
            host, port = parse_host_port(route, default_port=25)
        except ValueError as exc:
            raise CommandError(f"--route: {exc}") from exc
        route_obj = Route.for_address(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        domain = Domain.objects.filter(name=name.strip().rstrip(".").lower()).first() or Domain(name=name)
        domain.route, domain.active, domain.recipient_check = route_obj, True, recipient_check
        try:
            domain.full_clean(validate_unique=False)
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages)) from exc
        domain.save()
        self.stdout.write(f"{domain.name} -> {route_obj.address}")

    def do_list(self, **_):
        for domain in Domain.objects.select_related("route"):
            state = "" if domain.active else " (inactive)"
            self.stdout.write(f"{domain.name}\t{domain.route.address}\t{domain.recipient_check}{state}")

    def do_remove(self, name: str, **_):
        deleted, _ = Domain.objects.filter(name=name.strip().rstrip(".").lower()).delete()
        if not deleted:
            raise CommandError(f"{name} is not a protected domain")
        self.stdout.write(f"{name} removed")
