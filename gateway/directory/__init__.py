"""The organisation's directories (gateway.models.Directory): who may log in, and which recipients exist.

- `tls`: the encrypted connection every directory is reached over, with the certificate verified.
- `ldap`: LDAP and Active Directory: a login checked with django-auth-ldap, the person's role and addresses
  from their entry and groups, an address looked up, every address listed (`directory sync`).
- `imap`: a domain's IMAP server: a login is tried there, the MailWatch way; the address is the login.
- `login`: which directories a login is tried against, and the account it becomes (refreshed at each login).
- `recipients`: the recipient check of a domain whose check is "ldap", cached like the call-ahead.

The login throttle (gateway.throttle) calls `login.authenticate` after the local password check, so the site,
the Django admin and SMTP AUTH all reach the directories through the one throttled path.
"""
