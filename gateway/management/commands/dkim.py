from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from gateway.mailauth import dkim
from gateway.models import DKIMKey, Domain


class Command(BaseCommand):
    help = "DKIM signing keys of our domains: genkey (prints the DNS record to publish), list, show, remove."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        gen = sub.add_parser("genkey", help="make a new signing key for a protected domain")
        gen.add_argument("domain")
        gen.add_argument("--selector", default="mailgate", help="DNS selector (default %(default)s)")
        gen.add_argument("--algorithm", choices=["rsa", "ed25519"], default="rsa",
                         help="rsa (2048 bits, understood everywhere) or ed25519 (RFC 8463; sign with both if "
                              "you use it, as not every verifier knows it)")
        gen.add_argument("--bits", type=int, default=2048, help="RSA key size (default %(default)s)")
        gen.add_argument("--keep-others", action="store_true",
                         help="keep the domain's other keys active (by default the new key is the only one "
                              "that signs; the old ones stay, inactive, until you remove them)")
        sub.add_parser("list", help="list the keys")
        show = sub.add_parser("show", help="print the DNS record of a domain's keys")
        show.add_argument("domain")
        remove = sub.add_parser("remove", help="delete a key")
        remove.add_argument("domain")
        remove.add_argument("--selector", required=True)

    def handle(self, *args, action: str, **options):
        getattr(self, f"do_{action}")(**options)

    @staticmethod
    def _domain(name: str) -> Domain:
        domain = Domain.objects.filter(name=name.strip().rstrip(".").lower()).first()
        if domain is None:
            raise CommandError(f"{name} is not a protected domain (add it with `manage.py domain add`)")
        return domain

    def _print_record(self, key: DKIMKey) -> None:
        self.stdout.write(f"; publish this TXT record, then mail from {key.domain.name} is signed ({key.algorithm})")
        self.stdout.write(dkim.zone_file_entry(key.selector, key.domain.name, key.public_txt))

    @transaction.atomic
    def do_genkey(self, domain: str, selector: str, algorithm: str, bits: int, keep_others: bool, **_):
        target = self._domain(domain)
        selector = selector.strip().lower()
        if not selector or not all(c.isalnum() or c in "-_." for c in selector) or len(selector) > 63:
            raise CommandError(f"--selector {selector!r}: letters, digits, '-', '_' and '.' only")
        if DKIMKey.objects.filter(domain=target, selector=selector).exists():
            raise CommandError(f"{selector}._domainkey.{target.name} exists already: choose another --selector "
                               "(rotating keys needs a new one) or remove the old key")
        try:
            private, txt = dkim.generate_key(algorithm, bits=bits)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        if not keep_others:
            DKIMKey.objects.filter(domain=target, active=True).update(active=False)
        algorithms = {"rsa": DKIMKey.Algorithm.RSA, "ed25519": DKIMKey.Algorithm.ED25519}
        key = DKIMKey.objects.create(domain=target, selector=selector, private_key=private, public_txt=txt,
                                     algorithm=algorithms[algorithm])
        self._print_record(key)

    def do_list(self, **_):
        for key in DKIMKey.objects.select_related("domain"):
            state = "active" if key.active else "inactive"
            self.stdout.write(f"{key.domain.name}\t{key.selector}\t{key.algorithm}\t{state}\t"
                              f"{key.created_at:%Y-%m-%d}")

    def do_show(self, domain: str, **_):
        keys = DKIMKey.objects.filter(domain=self._domain(domain)).select_related("domain")
        if not keys:
            raise CommandError(f"{domain} has no DKIM key (make one with `manage.py dkim genkey {domain}`)")
        for key in keys:
            self._print_record(key)

    def do_remove(self, domain: str, selector: str, **_):
        deleted, _ = DKIMKey.objects.filter(domain=self._domain(domain), selector=selector.lower()).delete()
        if not deleted:
            raise CommandError(f"{domain} has no key with selector {selector}")
        self.stdout.write(f"{selector}._domainkey.{domain} removed")
