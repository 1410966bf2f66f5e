"""python manage.py generate_messages --count N [--days 30]: fill the mail log with realistic messages.

For demonstrations, for trying the reports, and for the benchmark (bench/reports): a verdict mix of a real
gateway (mostly clean, a fair share of spam, a little virus and blocked attachments, refusals at SMTP time
for unknown users, RBL listings, unresolvable senders…), senders that repeat (newsletters, partners) among
many one-off spammers, recipients across the protected domains, working-hours traffic, SpamAssassin rule hits
with their descriptions.

PostgreSQL: COPY in batches (a million messages in a couple of minutes); other databases: bulk_create. Then
the roll-ups are rebuilt.
"""

from __future__ import annotations

import json
import random
import secrets
import time
from datetime import timedelta

from django.core.management.base import BaseCommand, CommandError
from django.db import connection, transaction
from django.utils import timezone

from gateway.models import Domain, Message, RawMessage, Recipient, Route
from reports.rollup import refresh

FIRST_NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "niaj",
               "olivia", "peggy", "rupert", "sybil", "trent", "victor", "walter", "yvonne", "zoe", "anna", "ben",
               "chloe", "daniel", "emma", "felix", "hanna", "isaac", "jonas", "karin", "lena", "marc", "nora",
               "oscar", "paula", "quentin", "rosa", "stefan", "tina"]
ROLE_ADDRESSES = ["info", "sales", "support", "billing", "hr", "jobs", "office", "accounts", "press", "admin"]
LEGIT_DOMAINS = ["gmail.com", "outlook.com", "yahoo.com", "gmx.de", "web.de", "icloud.com", "proton.me",
                 "mailchimp-news.com", "github.com", "linkedin.com", "amazon.com", "paypal.com", "dhl.com",
                 "salesforce.com", "atlassian.net", "zoom.us", "bank-example.com", "supplier-one.com",
                 "partner-two.org", "university.edu"]
SPAM_WORDS = ["cheap", "best", "deal", "promo", "win", "lucky", "crypto", "pharma", "casino", "loan", "offer",
              "secure", "verify", "update", "prize", "bonus"]
SPAM_TLDS = ["top", "xyz", "click", "info", "ru", "cn", "biz", "online", "site", "icu"]
CLEAN_SUBJECTS = ["Meeting tomorrow", "Re: Quarterly report", "Invoice {n}", "Your order #{n} has shipped",
                  "Weekly newsletter", "Re: Project update", "Lunch on Friday?", "Contract draft v{n}",
                  "[GitHub] New pull request #{n}", "Password reset", "Welcome aboard", "Fwd: Photos",
                  "Agenda for the board meeting", "Re: Re: Offer {n}", "Travel booking confirmation"]
SPAM_SUBJECTS = ["You have WON ${n}!", "Cheap meds, no prescription", "Verify your account now",
                 "Hot singles in your area", "Your package could not be delivered", "URGENT: invoice overdue",
                 "Make $5000 a week from home", "Crypto opportunity of the year", "Re: your payment",
                 "Last chance: {n}% off"]
HAM_RULES = [("BAYES_00", -1.9, "Bayes spam probability is 0 to 1%"),
             ("DKIM_VALID", -0.1, "Message has at least one valid DKIM or DK signature"),
             ("DKIM_SIGNED", 0.1, "Message has a DKIM or DK signature, not necessarily valid"),
             ("SPF_PASS", -0.001, "SPF: sender matches SPF record"),
             ("HTML_MESSAGE", 0.001, "HTML included in message"),
             ("RCVD_IN_DNSWL_NONE", -0.0001, "Sender listed at https://www.dnswl.org/, no trust"),
             ("MAILING_LIST_MULTI", -1.0, "Multiple indicators imply a widely-seen list manager")]
SPAM_RULES = [("BAYES_99", 3.5, "Bayes spam probability is 99 to 100%"),
              ("BAYES_80", 2.0, "Bayes spam probability is 80 to 95%"),
              ("URIBL_BLACK", 1.7, "Contains an URL listed in the URIBL blacklist"),
              ("URIBL_ABUSE_SURBL", 1.9, "Contains an URL listed in the ABUSE SURBL blocklist"),
              ("RCVD_IN_SBL", 2.6, "Received via a relay in Spamhaus SBL"),
              ("RCVD_IN_XBL", 3.0, "Received via a relay in Spamhaus XBL"),
              ("HTML_IMAGE_ONLY_12", 2.2, "HTML: images with 800-1200 bytes of words"),
              ("MIME_HTML_ONLY", 0.1, "Message only has text/html MIME parts"),
              ("FREEMAIL_FORGED_REPLYTO", 2.1, "Freemail in Reply-To, but not From"),
              ("SUBJ_ALL_CAPS", 0.5, "Subject is all capitals"),
              ("LOTS_OF_MONEY", 0.001, "Huge... sums of money"),
              ("ADVANCE_FEE_4_NEW", 3.0, "Appears to be advance fee fraud (Nigerian 419)"),
              ("SPF_FAIL", 0.9, "SPF: sender does not match SPF record (fail)"),
              ("DKIM_ADSP_NXDOMAIN", 0.8, "No valid author signature and domain not in DNS"),
              ("PYZOR_CHECK", 1.9, "Similar message reported to Pyzor"),
              ("RAZOR2_CHECK", 1.7, "Listed in Razor2"),
              ("TVD_PH_SEC", 0.5, "Message includes a phrase commonly used in phishing mails"),
              ("GTUBE", 1000.0, "Generic Test for Unsolicited Bulk Email")]
VIRUSES = ["Win.Trojan.Emotet-9953318-0", "Doc.Downloader.Emotet-9953321-0", "Eicar-Test-Signature",
           "Xls.Dropper.Agent-1234567-0", "Html.Phishing.Bank-123", "Js.Trojan.Nemucod-4821", "Win.Ransomware.Locky-1",
           "Pdf.Exploit.CVE_2018_4990-1"]
BLOCKED_NAMES = ["invoice.pdf.exe", "scan_0042.scr", "document.js", "payment.vbs", "setup.bat", "photo.jpg.exe",
                 "update.cmd", "order.zip"]
REFUSALS = [("unknown_user", 40), ("rbl", 30), ("cant_resolve", 10), ("relay_denied", 8), ("greylisted", 7),
            ("spf", 5)]
REFUSAL_REPLIES = {"unknown_user": "550 5.1.1 Recipient address rejected: user unknown",
                   "rbl": "554 5.7.1 Service unavailable; client host blocked using zen.example-dnsbl.org",
                   "cant_resolve": "450 4.1.8 Sender address rejected: domain not found",
                   "relay_denied": "550 5.7.1 Relaying denied", "greylisted": "451 4.7.1 Greylisted, try again later",
                   "spf": "550 5.7.23 SPF check failed"}
# Working hours carry most of the mail (weights for 00h … 23h).
HOUR_WEIGHTS = [2, 1, 1, 1, 1, 2, 4, 7, 10, 11, 11, 10, 8, 9, 10, 10, 9, 7, 5, 4, 3, 3, 2, 2]
VERDICTS = [("clean", 70), ("spam", 15), ("high_spam", 8), ("virus", 1.5), ("blocked_attachment", 1.5)]


class Generator:
    def __init__(self, domains: list[str], days: int, seed: int | None):
        self.rng = random.Random(seed)
        self.days = days
        self.now = timezone.now()
        self.domains = domains
        rng = self.rng
        self.local_users = [f"{name}@{domain}" for domain in domains for name in FIRST_NAMES + ROLE_ADDRESSES]
        self.legit_senders = [self._legit_address() for _ in range(3000)]
        # Zipf-like: a few senders (newsletters, partners) send much of the clean mail.
        self.legit_weights = [1.0 / (rank + 1) ** 0.9 for rank in range(len(self.legit_senders))]
        self.spam_domains = [f"{rng.choice(SPAM_WORDS)}{rng.choice(SPAM_WORDS)}{rng.randrange(100)}."
                             f"{rng.choice(SPAM_TLDS)}" for _ in range(4000)]
        self.spam_senders = [f"{rng.choice(SPAM_WORDS)}{rng.randrange(10000)}@{rng.choice(self.spam_domains)}"
                             for _ in range(20000)]
        self.external = [f"{rng.choice(FIRST_NAMES)}@{rng.choice(LEGIT_DOMAINS)}" for _ in range(2000)]
        self.day_weights = HOUR_WEIGHTS

    def _legit_address(self) -> str:
        rng = self.rng
        local = rng.choice(FIRST_NAMES + ["news", "noreply", "billing", "team", "orders"])
        if rng.random() < .5:
            local += f"{rng.choice(['', '.', '_'])}{rng.randrange(1000)}"
        return f"{local}@{rng.choice(LEGIT_DOMAINS)}"

    def received_at(self):
        rng = self.rng
        while True:
            day = rng.randrange(self.days)
            hour = rng.choices(range(24), weights=self.day_weights)[0]
            local_now = timezone.localtime(self.now)
            start = local_now.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=day)
            when = start + timedelta(hours=hour, seconds=rng.randrange(3600), microseconds=rng.randrange(10**6))
            if when.weekday() >= 5 and rng.random() < 0.45:
                continue  # weekends are quieter
            if when <= self.now:
                return when

    def message(self) -> tuple[dict, list[dict], bytes | None]:
        rng = self.rng
        received = self.received_at()
        queue_id = secrets.token_hex(8).upper()
        n = rng.randrange(1, 99999)
        client_ip = f"{rng.choice([185, 194, 203, 45, 91, 77, 5, 62])}.{rng.randrange(256)}." \
                    f"{rng.randrange(256)}.{rng.randrange(1, 255)}"
        base = {"queue_id": queue_id, "received_at": received, "node": "gw1", "client_ip": client_ip,
                "direction": "inbound"}
        if rng.random() < 0.18:  # refused at SMTP time
            reason = rng.choices([r for r, _ in REFUSALS], weights=[w for _, w in REFUSALS])[0]
            sender = rng.choice(self.spam_senders if rng.random() < .8 else self.legit_senders)
            rcpt = f"{rng.choice(FIRST_NAMES)}{rng.randrange(100)}@{rng.choice(self.domains)}" \
                if reason == "unknown_user" else rng.choice(self.local_users)
            if reason == "relay_denied":
                rcpt = rng.choice(self.external)
            fields = {**base, "state": "refused", "refusal_reason": reason, "smtp_reply": REFUSAL_REPLIES[reason],
                      "envelope_sender": sender, "sender_domain": sender.rsplit("@", 1)[1], "helo": "unknown",
                      "completed_at": received}
            return fields, [{"address": rcpt, "domain": rcpt.rsplit("@", 1)[1], "status": "refused",
                             "received_at": received, "reply_code": int(REFUSAL_REPLIES[reason][:3]),
                             "reply_text": REFUSAL_REPLIES[reason][4:]}], None

        verdict = rng.choices([v for v, _ in VERDICTS], weights=[w for _, w in VERDICTS])[0]
        outbound = verdict == "clean" and rng.random() < 0.12
        if outbound:
            sender = rng.choice(self.local_users)
            recipients = rng.sample(self.external, k=rng.choice([1, 1, 1, 2, 3]))
            direction = "outbound"
        else:
            sender = rng.choices(self.legit_senders, weights=self.legit_weights)[0] if verdict == "clean" \
                else rng.choice(self.spam_senders)
            recipients = rng.sample(self.local_users, k=rng.choice([1, 1, 1, 1, 2, 3]))
            direction = "inbound"
        size = max(400, min(25_000_000, int(rng.lognormvariate(9.3, 1.3))))
        rules: list[dict] = []
        score: float | None
        viruses: list[str] = []
        attachments: list[dict] = []
        if verdict == "clean":
            score = round(rng.gauss(-0.8, 1.6), 1)
            score = min(score, 4.9)
            picked = rng.sample(HAM_RULES, k=rng.randint(1, 4))
            subject = rng.choice(CLEAN_SUBJECTS).format(n=n)
        elif verdict in ("spam", "high_spam"):
            score = round(rng.uniform(5.0, 14.9) if verdict == "spam" else rng.uniform(15.0, 48.0), 1)
            picked = rng.sample(SPAM_RULES[:-1], k=rng.randint(3, 7))
            if verdict == "high_spam" and rng.random() < 0.01:
                picked.append(SPAM_RULES[-1])
                score = 1000.0
            subject = rng.choice(SPAM_SUBJECTS).format(n=n)
        else:
            score = round(rng.gauss(1.0, 2.0), 1) if rng.random() < .5 else None
            picked = []
            subject = rng.choice(CLEAN_SUBJECTS + SPAM_SUBJECTS).format(n=n)
            if verdict == "virus":
                viruses = [rng.choice(VIRUSES)]
                name = rng.choice(["invoice.doc", "scan.pdf", "order.zip", "details.xls"])
            else:
                name = rng.choice(BLOCKED_NAMES)
            attachments = [{"name": name, "type": "application/octet-stream", "size": size // 2,
                            "sha256": secrets.token_hex(32), "blocked": verdict == "blocked_attachment",
                            "reason": f"*.{name.rsplit('.', 1)[1]}" if verdict == "blocked_attachment" else ""}]
        rules = [{"name": name, "score": rule_score, "description": text} for name, rule_score, text in picked]
        quarantined = verdict in ("high_spam", "virus", "blocked_attachment")
        state = "quarantined" if quarantined else "delivered"
        action = {"clean": "deliver", "spam": "tag"}.get(verdict, "quarantine")
        scanned = received + timedelta(seconds=rng.uniform(0.3, 3))
        fields = {**base, "direction": direction, "state": state, "envelope_sender": sender,
                  "sender_domain": sender.rsplit("@", 1)[1], "helo": f"mail.{sender.rsplit('@', 1)[1]}",
                  "client_name": f"mail.{sender.rsplit('@', 1)[1]}", "header_from": sender, "subject": subject,
                  "message_id": f"<{queue_id.lower()}@{sender.rsplit('@', 1)[1]}>", "size": size, "verdict": verdict,
                  "action": action, "quarantined": quarantined, "spam_score": score, "spam_threshold": 5.0,
                  "spam_rules": rules, "virus_names": viruses, "attachments": attachments,
                  "checks": {"spf": {"result": "pass" if verdict == "clean" else rng.choice(["fail", "softfail",
                                                                                           "none", "pass"])}},
                  "smtp_reply": f"250 2.0.0 Ok: queued as {queue_id}", "attempts": 1, "scanned_at": scanned,
                  "completed_at": scanned + timedelta(seconds=rng.uniform(0.1, 2))}
        rcpt_status = "quarantined" if quarantined else "delivered"
        rcpts = [{"address": address, "domain": address.rsplit("@", 1)[1], "status": rcpt_status,
                  "received_at": received, "verdict": verdict, "action": action,
                  "reply_code": 250 if not quarantined else None,
                  "reply_text": f"2.0.0 Ok: queued as {secrets.token_hex(5).upper()}" if not quarantined else "",
                  "attempts": 0 if quarantined else 1,
                  "delivered_at": None if quarantined else fields["completed_at"]} for address in recipients]
        raw = None
        if quarantined and rng.random() < 0.05:
            raw = (f"Received: from {fields['client_name']} ({fields['client_name']} [{client_ip}])\r\n"
                   f"\tby gw1.{self.domains[0]} with ESMTP id {queue_id}; {received:%a, %d %b %Y %H:%M:%S %z}\r\n"
                   f"From: {sender}\r\nTo: {', '.join(recipients)}\r\nSubject: {subject}\r\n"
                   f"Message-ID: {fields['message_id']}\r\nMIME-Version: 1.0\r\n"
                   f"Content-Type: text/plain; charset=utf-8\r\n\r\nGenerated test message {n}.\r\n").encode()
        return fields, rcpts, raw


def _column_defaults(model) -> list[tuple[str, str, object]]:
    """(attribute, column, default as COPY/bulk value) for each concrete column but the primary key."""
    out = []
    for field in model._meta.concrete_fields:
        if field.primary_key:
            continue
        default = field.get_default()
        out.append((field.attname, field.column, default))
    return out


class Command(BaseCommand):
    help = "Insert realistic generated messages into the mail log, then rebuild the report roll-ups."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--count", type=int, required=True, help="How many messages (and refused attempts)")
        parser.add_argument("--days", type=int, default=30, help="Spread over this many days back from now")
        parser.add_argument("--domains", default="example.com,example.net,example.org",
                            help="Protected domains the mail is for (created when missing)")
        parser.add_argument("--batch", type=int, default=20000)
        parser.add_argument("--seed", type=int, default=None)
        parser.add_argument("--no-rollup", action="store_true", help="Do not rebuild the roll-ups afterwards")

    def handle(self, *args, **options) -> None:
        count, days = options["count"], options["days"]
        if count < 0 or days < 1:
            raise CommandError("--count must be >= 0 and --days >= 1")
        domains = [d.strip().lower() for d in options["domains"].split(",") if d.strip()]
        route = Route.objects.filter(name="generated").first() or Route.objects.create(
            name="generated", host="127.0.0.1", port=25)
        for name in domains:
            Domain.objects.get_or_create(name=name, defaults={"route": route})
        generator = Generator(domains, days, options["seed"])
        started = time.monotonic()
        insert = self._copy_batch if connection.vendor == "postgresql" else self._bulk_batch
        done = 0
        while done < count:
            size = min(options["batch"], count - done)
            batch = [generator.message() for _ in range(size)]
            with transaction.atomic():
                insert(batch)
            done += size
            rate = done / max(time.monotonic() - started, 1e-6)
            self.stdout.write(f"\r{done}/{count} messages ({rate:,.0f}/s)", ending="")
            self.stdout.flush()
        self.stdout.write("")
        if connection.vendor == "postgresql" and not connection.in_atomic_block:
            # VACUUM too, not only ANALYZE: it sets the visibility map that index-only scans need, which
            # autovacuum would otherwise do some time after a bulk load.
            with connection.cursor() as cursor:
                cursor.execute("VACUUM ANALYZE gateway_message")
                cursor.execute("VACUUM ANALYZE gateway_recipient")
        elif connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("ANALYZE gateway_message")
                cursor.execute("ANALYZE gateway_recipient")
        self.stdout.write(f"Inserted {count} messages in {time.monotonic() - started:.1f} s")
        if not options["no_rollup"]:
            rolled = time.monotonic()
            refreshed = refresh(force_all=True)
            self.stdout.write(f"Roll-ups rebuilt for {refreshed} day(s) in {time.monotonic() - rolled:.1f} s")

    def _copy_batch(self, batch: list) -> None:
        message_columns = _column_defaults(Message)
        recipient_columns = [c for c in _column_defaults(Recipient) if c[0] != "message_id"]
        json_attrs = {f.attname for f in Message._meta.concrete_fields if f.get_internal_type() == "JSONField"}
        json_attrs |= {f.attname for f in Recipient._meta.concrete_fields if f.get_internal_type() == "JSONField"}
        with connection.cursor() as cursor:
            cursor.execute("SELECT nextval(pg_get_serial_sequence('gateway_message', 'id')) "
                           "FROM generate_series(1, %s)", [len(batch)])
            ids = [row[0] for row in cursor.fetchall()]
            raw_cursor = cursor.cursor  # psycopg's own cursor, for COPY

            def value(attr: str, provided: dict, default):
                found = provided.get(attr, default)
                return json.dumps(found) if attr in json_attrs else found

            columns = ", ".join(["id"] + [column for _, column, _ in message_columns])
            with raw_cursor.copy(f"COPY gateway_message ({columns}) FROM STDIN") as copy:
                for message_id, (fields, _, _) in zip(ids, batch, strict=True):
                    copy.write_row([message_id] + [value(attr, fields, default)
                                                   for attr, _, default in message_columns])
            columns = ", ".join(["message_id"] + [column for _, column, _ in recipient_columns])
            with raw_cursor.copy(f"COPY gateway_recipient ({columns}) FROM STDIN") as copy:
                for message_id, (_, rcpts, _) in zip(ids, batch, strict=True):
                    for rcpt in rcpts:
                        copy.write_row([message_id] + [value(attr, rcpt, default)
                                                       for attr, _, default in recipient_columns])
            with raw_cursor.copy("COPY gateway_rawmessage (message_id, data) FROM STDIN") as copy:
                for message_id, (_, _, raw) in zip(ids, batch, strict=True):
                    if raw is not None:
                        copy.write_row([message_id, raw])

    def _bulk_batch(self, batch: list) -> None:
        messages = Message.objects.bulk_create([Message(**fields) for fields, _, _ in batch])
        Recipient.objects.bulk_create([Recipient(message=message, **rcpt) for message, (_, rcpts, _)
                                       in zip(messages, batch, strict=True) for rcpt in rcpts])
        RawMessage.objects.bulk_create([RawMessage(message=message, data=raw) for message, (_, _, raw)
                                        in zip(messages, batch, strict=True) if raw is not None])
