"""Delivery: relaying a scanned (or released) message to the mail server of each recipient's domain.
`attempt` is one pass over a message's due recipients and records each outcome; `routing` says where a
domain's mail goes; `content` builds the bytes sent; `client` speaks SMTP to the next hop; `dsn` tells the
sender what failed; `signing` adds our DKIM signature to our own mail."""
