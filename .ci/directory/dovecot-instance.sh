#!/usr/bin/env bash
# Dovecot's IMAP server with the test mailboxes (imap-users), on loopback only:
#   dovecot-instance.sh start DIR IMAP_PORT IMAPS_PORT TLS_DIR   imap:// (STARTTLS) and imaps://
#   dovecot-instance.sh stop DIR
# DIR holds its configuration, run directory and mail; TLS_DIR the test CA's server certificate (test-ca.sh).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
action=${1:?start or stop}
dir=${2:?directory}

case $action in
stop) [[ -f $dir/dovecot.conf ]] && doveadm -c "$dir/dovecot.conf" stop 2>/dev/null || true ;;
start)
    imap_port=${3:?IMAP port} imaps_port=${4:?IMAPS port} tls=${5:?TLS directory}
    [[ -f $dir/dovecot.conf ]] && doveadm -c "$dir/dovecot.conf" stop 2>/dev/null || true
    mkdir -p "$dir/run" "$dir/mail"
    cp "$HERE/imap-users" "$dir/users"
    chmod 0644 "$dir/users"
    cat >"$dir/dovecot.conf" <<CONF
# Written by .ci/directory/dovecot-instance.sh: the test IMAP server.
protocols = imap
listen = 127.0.0.1
base_dir = $dir/run
instance_name = mailgate-test
log_path = $dir/dovecot.log
ssl = yes
ssl_cert = <$tls/server.pem
ssl_key = <$tls/server.key
ssl_min_protocol = TLSv1.2
# Passwords only inside TLS (Dovecot counts loopback as secured; the gateway asks for TLS itself).
disable_plaintext_auth = yes
auth_mechanisms = plain login
# The gateway asks on behalf of many people from one address: as a trusted client it is not slowed down for
# the failures of others (Dovecot's auth penalty), as a real IMAP server should be set for it (docs/directory.md).
login_trusted_networks = 127.0.0.0/8
mail_location = maildir:$dir/mail/%u
# The mailboxes belong to the dovecot user, whose uid is a system one.
first_valid_uid = 100
passdb {
  driver = passwd-file
  args = scheme=PLAIN username_format=%u $dir/users
}
userdb {
  driver = static
  args = uid=dovecot gid=dovecot home=$dir/mail/%u
}
service imap-login {
  inet_listener imap {
    address = 127.0.0.1
    port = $imap_port
  }
  inet_listener imaps {
    address = 127.0.0.1
    port = $imaps_port
    ssl = yes
  }
}
service stats {
  unix_listener stats-reader {
    mode = 0666
  }
  unix_listener stats-writer {
    mode = 0666
  }
}
CONF
    chown dovecot:dovecot "$dir/mail"
    # Its own output to a file: a daemon that kept the caller's stdout would hold a pipe open forever.
    dovecot -c "$dir/dovecot.conf" </dev/null >>"$dir/dovecot.out" 2>&1
    for ((i = 0; i < 100; i++)); do
        if python3 - "$imap_port" <<'PY' 2>/dev/null; then exit 0; fi
import socket, sys
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2) as s:
    sys.exit(0 if s.recv(200).startswith(b"* OK") else 1)
PY
        sleep 0.1
    done
    echo "dovecot did not answer on 127.0.0.1:$imap_port; see $dir/dovecot.log" >&2
    exit 1
    ;;
*) echo "usage: $0 start DIR IMAP_PORT IMAPS_PORT TLS_DIR | stop DIR" >&2; exit 2 ;;
esac
