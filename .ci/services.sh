#!/usr/bin/env bash
# Install and start the services the tests need, with an offline configuration:
#   spamd on 127.0.0.1:7830 (SpamAssassin, no network tests, Bayes learning through TELL),
#   clamd on a Unix socket and 127.0.0.1:3310 (a local signature database, no freshclam),
#   OpenLDAP's slapd with the test directory on 127.0.0.1:3890 (StartTLS) and 6360 (LDAPS), and Dovecot's IMAP
#   server with test mailboxes on 127.0.0.1:1143 (STARTTLS) and 1993 (IMAPS), both with a test CA
#   (.ci/directory/: the directory, the mailboxes, and the scripts that start each),
# and make sure the machine's PostgreSQL (127.0.0.1:5432) and Redis (127.0.0.1:6379) answer.
# Postfix, swaks, Chromium, the DKIM tools, fail2ban, pflogsumm and docker-compose are installed but nothing of
# them is started (fail2ban-regex and pflogsumm read the mail log in tests/ops/test_fail2ban.py and
# test_mail_log.py; docker-compose checks docker-compose.yml).
#
# Run as root on Debian 12 (`make services`, and .ci/run). Idempotent: packages already installed
# are not fetched again, and a service that answers is left alone, unless its configuration
# changed since this script started it, in which case it is restarted.
# At the end it prints the environment to use and writes it to .ci/state/env (for `source`).
# docs/operations.md explains the choices.
#
# Settings (environment): MAILGATE_STATE_DIR (default /var/lib/mailgate-test), MAILGATE_RUN_DIR
# (default /run/mailgate-clamd), SPAMD_PORT (7830), CLAMD_PORT (3310), LDAP_PORT (3890), LDAPS_PORT (6360),
# IMAP_PORT (1143), IMAPS_PORT (1993), MAILGATE_CORPUS (../shared/corpus beside the repository).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
CORPUS="${MAILGATE_CORPUS:-$(cd "$ROOT/.." && pwd)/shared/corpus}"
STATE="${MAILGATE_STATE_DIR:-/var/lib/mailgate-test}"
RUN_DIR="${MAILGATE_RUN_DIR:-/run/mailgate-clamd}"
SPAMD_PORT="${SPAMD_PORT:-7830}"
CLAMD_PORT="${CLAMD_PORT:-3310}"
ENV_FILE="$HERE/state/env"

SPAMD_URL="tcp://127.0.0.1:$SPAMD_PORT"
CLAMD_URL="unix://$RUN_DIR/clamd.sock"
CLAMD_TCP_URL="tcp://127.0.0.1:$CLAMD_PORT"
LDAP_PORT="${LDAP_PORT:-3890}"
LDAPS_PORT="${LDAPS_PORT:-6360}"
IMAP_PORT="${IMAP_PORT:-1143}"
IMAPS_PORT="${IMAPS_PORT:-1993}"
TEST_TLS="$STATE/tls"
REDIS_URL="redis://127.0.0.1:6379/15"
PG_URL="postgres://postgres@127.0.0.1:5432/mailgate"

PACKAGES=(spamassassin spamc clamav-daemon clamav-testfiles postfix swaks chromium opendkim-tools libmail-dkim-perl
    fail2ban pflogsumm docker-compose systemd unbound slapd ldap-utils dovecot-imapd libldap2-dev libsasl2-dev)
EICAR_MD5_LINE="44d88612fea8a8f36de82e1278abb02f:68:Eicar-Test-Signature"
CLAM_EXE_MD5_LINE="aa15bcf478d165efd2065190eb473bcb:544:ClamAV-Test-File"

log() { printf '[services] %s\n' "$*" >&2; }
die() { printf '[services] ERROR: %s\n' "$*" >&2; exit 1; }
ci_mode() { case "${CI:-}" in "" | 0 | false | False | no) return 1 ;; *) return 0 ;; esac; }

# --- probes ------------------------------------------------------------------------------------
# One real protocol exchange per service, with a short timeout: a port that accepts but does not
# speak the protocol is not "up". python3 is there on every machine that runs the project.
probe() {  # probe KIND URL  -> exit 0 if it answers
    python3 - "$@" <<'PY'
import socket
import sys
from urllib.parse import urlparse

kind, url = sys.argv[1], sys.argv[2]
u = urlparse(url)
try:
    if u.scheme == "unix":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(3)
        s.connect(u.path)
    else:
        s = socket.create_connection((u.hostname, u.port), timeout=3)
    with s:
        if kind == "spamd":
            s.sendall(b"PING SPAMC/1.5\r\n\r\n")
            ok = b"PONG" in s.recv(64)
        elif kind == "clamd":
            s.sendall(b"zPING\0")
            ok = s.recv(64).rstrip(b"\0\n") == b"PONG"
        elif kind == "clamd-eicar":
            eicar = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
            s.sendall(b"zINSTREAM\0" + len(eicar).to_bytes(4, "big") + eicar + b"\0\0\0\0")
            answer = s.recv(256)
            # Signatures outside the official database are reported as NAME.UNOFFICIAL.
            ok = answer.startswith(b"stream: Eicar-Test-Signature") and answer.rstrip(b"\0\n").endswith(b"FOUND")
            if not ok:
                print(f"clamd answered {answer!r} to EICAR", file=sys.stderr)
        elif kind == "imap":
            ok = s.recv(200).startswith(b"* OK")
        elif kind == "redis":
            s.sendall(b"PING\r\n")
            ok = s.recv(64).startswith(b"+PONG")
        else:
            raise SystemExit(f"unknown kind {kind}")
except OSError:
    ok = False
sys.exit(0 if ok else 1)
PY
}

wait_for() {  # wait_for KIND URL SECONDS
    local kind=$1 url=$2 seconds=$3 i
    for ((i = 0; i < seconds * 4; i++)); do
        probe "$kind" "$url" && return 0
        sleep 0.25
    done
    return 1
}

ldap_answers() {  # a bind of the gateway's service account over StartTLS, checked against the test CA
    [[ -s $TEST_TLS/ca.pem ]] && command -v ldapwhoami >/dev/null &&
        LDAPTLS_CACERT="$TEST_TLS/ca.pem" timeout 5 ldapwhoami -x -ZZ -H "ldap://127.0.0.1:$LDAP_PORT" \
            -D "cn=mailgate,ou=services,dc=example,dc=edu" -w gateway-bind-secret >/dev/null 2>&1
}

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_pidfile() {  # stop_pidfile PIDFILE NAME: end a daemon this script started before
    local pidfile=$1 name=$2 pid i
    pid_alive "$pidfile" || return 0
    pid="$(cat "$pidfile")"
    log "restarting $name (pid $pid): its configuration changed"
    kill "$pid"
    for ((i = 0; i < 40; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.25
    done
    die "$name (pid $pid) did not stop"
}

all_installed() {
    local p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || return 1
    done
}

write_env() {
    mkdir -p "$(dirname "$ENV_FILE")"
    {
        echo "# Written by .ci/services.sh; source it: set -a; . .ci/state/env; set +a"
        echo "export SPAMD_URL=$SPAMD_URL"
        echo "export CLAMD_URL=$CLAMD_URL"
        echo "export CLAMD_TCP_URL=$CLAMD_TCP_URL"
        echo "export REDIS_URL=$REDIS_URL"
        echo "export LDAP_URL=ldap://127.0.0.1:$LDAP_PORT"
        echo "export LDAPS_URL=ldaps://127.0.0.1:$LDAPS_PORT"
        echo "export IMAP_URL=imap://127.0.0.1:$IMAP_PORT"
        echo "export IMAPS_URL=imaps://127.0.0.1:$IMAPS_PORT"
        echo "export MAILGATE_TEST_CA=$TEST_TLS/ca.pem"
        if pg_isready -q -h 127.0.0.1 -p 5432 -t 3 2>/dev/null; then
            echo "export TEST_DATABASE_URL=$PG_URL"
        fi
    } >"$ENV_FILE.tmp"
    mv "$ENV_FILE.tmp" "$ENV_FILE"
    # The developer who ran `sudo make services` should be able to rewrite it next time.
    if [[ -n ${SUDO_UID:-} ]]; then chown "$SUDO_UID:${SUDO_GID:-$SUDO_UID}" "$ENV_FILE" "$(dirname "$ENV_FILE")"; fi
    log "environment (also in ${ENV_FILE#"$ROOT"/}):"
    sed -n 's/^export //p' "$ENV_FILE"
}

# --- not root: nothing to do when everything answers; else ask for root --------------------------
if [[ $EUID -ne 0 ]]; then
    if command -v dpkg-query >/dev/null && all_installed && probe spamd "$SPAMD_URL" && probe clamd "$CLAMD_URL" &&
        ldap_answers && probe imap "tcp://127.0.0.1:$IMAP_PORT"; then
        log "spamd, clamd, slapd and dovecot answer already"
        write_env
        exit 0
    fi
    command -v sudo >/dev/null || die "run as root (installs packages and starts spamd and clamd)"
    log "needs root: re-running with sudo"
    exec sudo --preserve-env=CI,MAILGATE_STATE_DIR,MAILGATE_RUN_DIR,SPAMD_PORT,CLAMD_PORT,LDAP_PORT,LDAPS_PORT,IMAP_PORT,IMAPS_PORT,MAILGATE_CORPUS \
        bash "$HERE/services.sh" "$@"
fi

# --- packages ----------------------------------------------------------------------------------
if all_installed; then
    log "packages present: ${PACKAGES[*]}"
else
    log "installing ${PACKAGES[*]} (a few minutes: SpamAssassin compiles its rules)"
    export DEBIAN_FRONTEND=noninteractive
    # Postfix only as a local test peer: no questions, nothing listening on the network.
    echo "postfix postfix/main_mailer_type select Local only" | debconf-set-selections
    echo "postfix postfix/mailname string $(hostname)" | debconf-set-selections
    # slapd without a directory of its own: the test directory is .ci/directory's, started on loopback below.
    echo "slapd slapd/no_configuration boolean true" | debconf-set-selections
    # Wait for another apt run (unattended-upgrades, a provisioning step) instead of failing.
    apt=(apt-get -q -o DPkg::Lock::Timeout=900)
    "${apt[@]}" update
    "${apt[@]}" install -y "${PACKAGES[@]}"
    all_installed || die "packages still missing after apt-get install"
fi

mkdir -p "$STATE/log"
chmod 0755 "$STATE" "$STATE/log"

# --- spamd -------------------------------------------------------------------------------------
SA_SITE="$STATE/spamassassin"
SA_BAYES="$STATE/bayes"
SPAMD_PID="$STATE/spamd.pid"
SPAMD_LOG="$STATE/log/spamd.log"

# The site config: Debian's /etc/spamassassin (plugin .pre files) plus our local.cf. The rules
# themselves come from /var/lib/spamassassin/<version> when sa-update ever ran, else from
# /usr/share/spamassassin, the rules shipped in the package (the case here: no internet).
rm -rf "$SA_SITE.new"
cp -a /etc/spamassassin "$SA_SITE.new"
sed "s|^bayes_path .*|bayes_path $SA_BAYES/bayes|" "$ROOT/conf/spamassassin/local.cf" >"$SA_SITE.new/local.cf"
chmod -R a+rX "$SA_SITE.new"
rm -rf "$SA_SITE"
mv "$SA_SITE.new" "$SA_SITE"
install -d -o debian-spamd -g debian-spamd -m 0770 "$SA_BAYES"
touch "$SPAMD_LOG"
chown debian-spamd:debian-spamd "$SPAMD_LOG"

if compgen -G "/var/lib/spamassassin/[0-9]*" >/dev/null; then
    log "spamd rules: sa-update rules in /var/lib/spamassassin"
else
    log "spamd rules: the package's /usr/share/spamassassin (sa-update never ran)"
fi

spamd_stamp="$( (cat "$SA_SITE"/*.cf "$SA_SITE"/*.pre; echo "$SPAMD_PORT") | sha256sum | cut -d' ' -f1)"
if probe spamd "$SPAMD_URL" && [[ "$(cat "$STATE/spamd.stamp" 2>/dev/null)" != "$spamd_stamp" ]] && pid_alive "$SPAMD_PID"; then
    stop_pidfile "$SPAMD_PID" spamd
fi
if probe spamd "$SPAMD_URL"; then
    log "spamd answers on $SPAMD_URL"
else
    pid_alive "$SPAMD_PID" && die "spamd (pid $(cat "$SPAMD_PID")) runs but does not answer on $SPAMD_URL; see $SPAMD_LOG"
    rm -f "$SPAMD_PID"
    log "starting spamd on 127.0.0.1:$SPAMD_PORT"
    # -x: no per-user configuration; every message is scanned with the site config and the one
    # shared Bayes database (bayes_path), which the TELL of --allow-tell also writes.
    spamd -d --listen "127.0.0.1:$SPAMD_PORT" -u debian-spamd -g debian-spamd -x \
        --siteconfigpath "$SA_SITE" -r "$SPAMD_PID" -s "$SPAMD_LOG" \
        --min-children 4 --max-children 4 --allow-tell
    wait_for spamd "$SPAMD_URL" 90 || {
        tail -n 30 "$SPAMD_LOG" >&2 || true
        die "spamd did not answer on $SPAMD_URL within 90 s"
    }
    echo "$spamd_stamp" >"$STATE/spamd.stamp"
    log "spamd is up (pid $(cat "$SPAMD_PID" 2>/dev/null || echo '?'), log $SPAMD_LOG)"
fi
# The rules must load: GTUBE scores ~1000. A score near 0 means spamd runs without rules.
gtube_score="$(printf 'Subject: GTUBE\n\nXJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X\n' |
    spamc -d 127.0.0.1 -p "$SPAMD_PORT" -c || true)"
[[ ${gtube_score%%/*} =~ ^[0-9]{3,}(\.[0-9]+)?$ ]] || die "spamd scored GTUBE '$gtube_score' (expected ~1000/5.0)"
log "spamd: GTUBE scores $gtube_score"

# --- clamd -------------------------------------------------------------------------------------
CLAM_DIR="$STATE/clamav"
CLAM_DB="$CLAM_DIR/db"
CLAM_CONF="$CLAM_DIR/clamd.conf"
CLAMD_PID="$RUN_DIR/clamd.pid"
CLAMD_LOG="$STATE/log/clamd.log"

install -d -m 0755 "$CLAM_DIR"
install -d -o clamav -g clamav -m 0755 "$CLAM_DB" "$RUN_DIR"
# freshclam cannot reach its servers here: a local database of two test signatures, EICAR and the
# harmless clam.exe of Debian's clamav-testfiles (which catches all 44 of its packed/archived forms).
printf '%s\n%s\n' "$EICAR_MD5_LINE" "$CLAM_EXE_MD5_LINE" >"$CLAM_DB/local.hdb"
# The corpus's own signature for clam.exe (SHA-256), when the corpus is beside the repository.
if [[ -f $CORPUS/virus/clamav.hdb ]]; then
    cp "$CORPUS/virus/clamav.hdb" "$CLAM_DB/corpus.hdb"
else
    log "note: $CORPUS/virus/clamav.hdb not found; local.hdb alone covers the test files"
    rm -f "$CLAM_DB/corpus.hdb"
fi
chown clamav:clamav "$CLAM_DB"/*.hdb
touch "$CLAMD_LOG"
chown clamav:clamav "$CLAMD_LOG"
cat >"$CLAM_CONF" <<EOF
# Written by .ci/services.sh: clamd with an offline signature database (docs/operations.md).
LocalSocket $RUN_DIR/clamd.sock
LocalSocketMode 666
FixStaleSocket yes
TCPSocket $CLAMD_PORT
TCPAddr 127.0.0.1
User clamav
PidFile $CLAMD_PID
LogFile $CLAMD_LOG
LogTime yes
DatabaseDirectory $CLAM_DB
OfficialDatabaseOnly no
ScanMail yes
ScanArchive yes
ScanHTML yes
ScanPE yes
ScanOLE2 yes
ScanPDF yes
StreamMaxLength 50M
MaxThreads 8
Foreground no
EOF

clamd_stamp="$(cat "$CLAM_CONF" "$CLAM_DB"/*.hdb | sha256sum | cut -d' ' -f1)"
if probe clamd "$CLAMD_URL" && [[ "$(cat "$STATE/clamd.stamp" 2>/dev/null)" != "$clamd_stamp" ]] && pid_alive "$CLAMD_PID"; then
    stop_pidfile "$CLAMD_PID" clamd
fi
if probe clamd "$CLAMD_URL"; then
    log "clamd answers on $CLAMD_URL"
else
    pid_alive "$CLAMD_PID" && die "clamd (pid $(cat "$CLAMD_PID")) runs but does not answer on $CLAMD_URL; see $CLAMD_LOG"
    log "starting clamd on $CLAMD_URL and $CLAMD_TCP_URL"
    clamd --config-file="$CLAM_CONF" || {
        tail -n 30 "$CLAMD_LOG" >&2 || true
        die "clamd failed to start"
    }
    wait_for clamd "$CLAMD_URL" 60 || {
        tail -n 30 "$CLAMD_LOG" >&2 || true
        die "clamd did not answer on $CLAMD_URL within 60 s"
    }
    echo "$clamd_stamp" >"$STATE/clamd.stamp"
    log "clamd is up (pid $(cat "$CLAMD_PID" 2>/dev/null || echo '?'), log $CLAMD_LOG)"
fi
probe clamd "$CLAMD_TCP_URL" || die "clamd answers on $CLAMD_URL but not on $CLAMD_TCP_URL (port taken by another clamd?)"
probe clamd-eicar "$CLAMD_URL" || die "clamd does not find EICAR: its signature database is wrong ($CLAM_DB)"
log "clamd: EICAR found"

# --- the test directory (slapd) and the test mailboxes (dovecot) ---------------------------------
# Each is started from its script in .ci/directory with a fresh copy of its data, and restarted when the data or
# the script changed since it was started (the stamp), so a test always meets the directory the LDIF describes.
bash "$ROOT/.ci/directory/test-ca.sh" "$TEST_TLS"
directory_stamp="$(cat "$ROOT"/.ci/directory/* | sha256sum | cut -d' ' -f1)"
if ! ldap_answers || [[ "$(cat "$STATE/slapd.stamp" 2>/dev/null)" != "$directory_stamp:$LDAP_PORT:$LDAPS_PORT" ]]; then
    log "starting slapd with the test directory on 127.0.0.1:$LDAP_PORT (StartTLS) and $LDAPS_PORT (LDAPS)"
    bash "$ROOT/.ci/directory/slapd-instance.sh" start "$STATE/slapd" "$LDAP_PORT" "$LDAPS_PORT" "$TEST_TLS" ||
        die "slapd did not start"
    echo "$directory_stamp:$LDAP_PORT:$LDAPS_PORT" >"$STATE/slapd.stamp"
fi
ldap_answers || die "slapd does not answer a StartTLS bind on 127.0.0.1:$LDAP_PORT"
log "slapd answers on 127.0.0.1:$LDAP_PORT and $LDAPS_PORT"
if ! probe imap "tcp://127.0.0.1:$IMAP_PORT" ||
    [[ "$(cat "$STATE/dovecot.stamp" 2>/dev/null)" != "$directory_stamp:$IMAP_PORT:$IMAPS_PORT" ]]; then
    log "starting dovecot with the test mailboxes on 127.0.0.1:$IMAP_PORT (STARTTLS) and $IMAPS_PORT (IMAPS)"
    bash "$ROOT/.ci/directory/dovecot-instance.sh" start "$STATE/dovecot" "$IMAP_PORT" "$IMAPS_PORT" "$TEST_TLS" ||
        die "dovecot did not start"
    echo "$directory_stamp:$IMAP_PORT:$IMAPS_PORT" >"$STATE/dovecot.stamp"
fi
log "dovecot answers on 127.0.0.1:$IMAP_PORT and $IMAPS_PORT"

# --- PostgreSQL and Redis (already running on the project's machines) --------------------------
problems=()
if ! pg_isready -q -h 127.0.0.1 -p 5432 -t 3 2>/dev/null; then
    if [[ -d /etc/postgresql ]] && command -v pg_ctlcluster >/dev/null; then
        log "starting PostgreSQL"
        pg_version="$(find /etc/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n 1)"
        pg_ctlcluster --skip-systemctl-redirect "$pg_version" main start || true
        for ((i = 0; i < 60; i++)); do
            pg_isready -q -h 127.0.0.1 -p 5432 -t 1 && break
            sleep 0.5
        done
    fi
fi
if pg_isready -q -h 127.0.0.1 -p 5432 -t 3 2>/dev/null; then
    # The database that `make run` and the tests name; Django creates and drops test_mailgate itself.
    if ! psql -h 127.0.0.1 -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'mailgate'" 2>/dev/null | grep -q 1; then
        if createdb -h 127.0.0.1 -U postgres mailgate 2>/dev/null; then
            log "created PostgreSQL database mailgate"
        else
            log "note: could not create database mailgate (not trust auth?); Django's test database still works"
        fi
    fi
    log "PostgreSQL answers on 127.0.0.1:5432"
else
    problems+=("PostgreSQL does not answer on 127.0.0.1:5432")
fi

if ! probe redis "$REDIS_URL"; then
    if command -v redis-server >/dev/null; then
        log "starting Redis"
        mkdir -p /var/lib/redis /var/log/redis
        redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
            --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
        wait_for redis "$REDIS_URL" 20 || true
    fi
fi
if probe redis "$REDIS_URL"; then
    log "Redis answers on 127.0.0.1:6379"
else
    problems+=("Redis does not answer on 127.0.0.1:6379")
fi

# Postfix is installed but not started: a test that needs it configures and starts its own.

write_env
if ((${#problems[@]})); then
    for p in "${problems[@]}"; do log "WARNING: $p"; done
    # With CI set every service is required, as in the test suite (tests/support/services.py).
    ci_mode && die "CI is set and not every service answers"
fi
log "done"
