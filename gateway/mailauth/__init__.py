"""Mail authentication: DNS, SPF, DKIM and DMARC.

The SMTP server and the scan task use these modules; none of them touches the database.

- `gateway.mailauth.dns`: the resolver every check uses (configurable nameservers, port and timeout), with a clear
  split between a definite "no" (NXDOMAIN, no records) and a temporary failure (`TemporaryDNSError`).
- `gateway.mailauth.spf`: `check_spf()` (RFC 7208, on pyspf) and the `Received-SPF` header.
- `gateway.mailauth.dkim`: `verify()` of every DKIM-Signature, `sign()`, `generate_key()` (RFC 6376, RFC 8463).
- `gateway.mailauth.dmarc`: `evaluate()` (RFC 7489) and `authentication_results()` (RFC 8601).
"""
