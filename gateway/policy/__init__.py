"""SMTP-time policy: the checks the SMTP server runs on each connection, HELO, sender, recipient and message.

- `config`: the snapshot of SMTPPolicy and the DNSBL zones the server enforces, and the DNS-checks switch.
- `results`: `CheckResult`, what one check found, what it did and how long it took (→ Message.checks).
- `dnscache`: the SMTP server's resolver: gateway.mailauth.dns with a short in-process cache.
- `checks`: the DNS-based checks (reverse DNS, DNSBL, HELO, sender domain, SPF, DKIM + DMARC).
- `limits`: per-client-IP counters kept in memory on this node (connections, messages, AUTH failures).
- `greylist`: the greylisting triplets (database, with a per-node cache of passed ones).
- `callahead`: recipient verification by an RCPT probe to the route's server, cached.

docs/smtp-policy.md describes every check, its settings and its default action.
"""
