"""SMTP-time policy: the checks the SMTP server runs on each connection, HELO, sender, recipient and message.

- `enforce`: where each check runs and is enforced, command by command (the handler asks it).
- `state`: what is kept per connection and per mail transaction while the client talks.
- `config`: the snapshot the server enforces (ServerConfig, CheckConfig) and the DNS-checks switch.
- `results`: `CheckResult`, what one check found, what it did and how long it took (→ Message.checks).
- `checks`: the DNS-based checks (reverse DNS, DNSBL, HELO, sender domain, SPF, DKIM + DMARC).
- `senders`: who mail may say it is from: a login's own addresses (authenticated mail), our domains from
  outside only with SPF or DKIM for them (the protected-sender check).
- `dnscache`: the SMTP server's resolver: gateway.mailauth.dns with a short in-process cache.
- `lists`: the allow and block lists (also read by the scan).
- `limits`: per-client-IP counters kept in memory on this node (connections, messages, AUTH failures).
- `greylist`: the greylisting triplets (database, with a per-node cache of passed ones).
- `callahead`: recipient verification by an RCPT probe to the route's server, cached.

docs/smtp-policy.md describes every check, its settings and its default action.
"""
