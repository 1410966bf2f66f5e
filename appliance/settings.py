"""Settings of the appliance: one module, read from the environment.

Every setting has a default that makes `make run` work with nothing configured
(SQLite, tasks run by the embedded worker, scanners off). Production points
DATABASE_URL at PostgreSQL, CELERY_BROKER_URL at Redis, and SPAMD_URL /
CLAMD_URL at the scanners. docs/configuration.md lists every variable.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import sys
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def envbool(name: str, default: str = "False") -> bool:
    return os.getenv(name, default).strip().lower() in ("1", "true", "yes", "on")


def envint(name: str, default: str = "0") -> int:
    return int(os.getenv(name, default))


def envfloat(name: str, default: str = "0") -> float:
    return float(os.getenv(name, default))


def envlist(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in os.getenv(name, default).split(",") if item.strip()]


def database_from_url(url: str) -> dict:
    """Turn postgres://user:pass@host:port/name or sqlite:///path into DATABASES['default']."""
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        path = unquote(parsed.path)
        # sqlite:///relative/file and sqlite:////absolute/file, as dj-database-url reads them
        name = path[1:] if path.startswith("/") else path
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": name or str(BASE_DIR / "data" / "gateway.sqlite3")}
    if parsed.scheme in ("postgres", "postgresql", "pgsql"):
        options = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": unquote(parsed.path.lstrip("/")) or "postgres",
            "USER": unquote(parsed.username or ""),
            "PASSWORD": unquote(parsed.password or ""),
            # An empty host with ?host=/run/postgresql selects the Unix socket.
            "HOST": unquote(parsed.hostname or options.pop("host", "")),
            "PORT": str(parsed.port or ""),
            "CONN_MAX_AGE": envint("DB_CONN_MAX_AGE", "60"),
            "CONN_HEALTH_CHECKS": True,
            "OPTIONS": {"connect_timeout": envint("DB_CONNECT_TIMEOUT", "5"), **options},
        }
    raise ValueError(f"DATABASE_URL: unsupported scheme {parsed.scheme!r} (use postgres:// or sqlite:///)")


_log = logging.getLogger("appliance.settings")


def private_directory(path: Path) -> None:
    """Create `path` 0700, or tighten it to 0700 (with a log line) when others may read or enter it."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            path.chmod(0o700)
            _log.warning("%s was open to other users (mode %03o); it is now 0700", path, mode)
    except OSError as exc:
        _log.warning("%s: could not make it private to this user: %s", path, exc)


def private_file(path: Path, *, create: bool) -> None:
    """Create `path` 0600 (when `create`), or tighten it to 0600 (with a log line) when others may read it."""
    try:
        if create:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        elif not path.exists():
            return
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            path.chmod(0o600)
            _log.warning("%s was readable by other users (mode %03o); it is now 0600", path, mode)
    except OSError as exc:
        _log.warning("%s: could not make it private to this user: %s", path, exc)


DEBUG = envbool("DEBUG", "False")


def _runs_the_appliance_here() -> bool:
    """`manage.py runappliance` (what `make run` starts): the one-machine development appliance."""
    return Path(sys.argv[0]).name == "manage.py" and sys.argv[1:2] == ["runappliance"]


SECRET_KEY = os.getenv("SECRET_KEY", "")
if not SECRET_KEY:
    # Fail closed: without a key of its own every process refuses to start, except where a public key does no
    # harm: DEBUG, `make run` (runappliance, its children inherit ALLOW_INSECURE_SECRET from it, and the Makefile
    # sets it for the migrate and collectstatic before it), the test suite (pytest sets PYTEST_VERSION for its
    # run, in every process it starts), or ALLOW_INSECURE_SECRET=true said on purpose.
    if _runs_the_appliance_here():
        os.environ["ALLOW_INSECURE_SECRET"] = "true"
    if DEBUG or envbool("ALLOW_INSECURE_SECRET", "False") or os.getenv("PYTEST_VERSION"):
        SECRET_KEY = "insecure-development-key-set-SECRET_KEY-in-production"
    else:
        raise ImproperlyConfigured(
            "SECRET_KEY is not set. Set it in the environment (python3 -c 'import secrets; "
            "print(secrets.token_urlsafe(50))'); only `make run` and the tests run without one.")

ALLOWED_HOSTS = envlist("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
CSRF_TRUSTED_ORIGINS = envlist("CSRF_TRUSTED_ORIGINS", "")

# The name of this node: in the log of every message, in our headers, in the SMTP greeting.
NODE_NAME = os.getenv("NODE_NAME", socket.gethostname())
# The name the SMTP server greets with and the authserv-id of Authentication-Results.
SMTP_HOSTNAME = os.getenv("SMTP_HOSTNAME", NODE_NAME)
PRODUCT_NAME = "Mailgate"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_otp",
    "django_otp.plugins.otp_totp",
    "gateway",
    "quarantine",
    "reports",
    "console",
    "digests",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "appliance.middleware.SecurityHeadersMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    # user.is_verified(): whether this session passed a second factor (django_otp), and then the rule that a
    # login with a device reaches nothing before it did, nor an administrator without one when it is required.
    "django_otp.middleware.OTPMiddleware",
    "console.twofactor.TwoFactorMiddleware",
    # A directory account's session follows its directory (its role and addresses searched again now and then).
    "console.directory_session.DirectorySessionMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "appliance.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "console.context_processors.scanner_status",
            ],
        },
    },
]
WSGI_APPLICATION = "appliance.wsgi.application"
ASGI_APPLICATION = "appliance.asgi.application"

DATA_DIR = Path(os.getenv("DATA_DIR", str(BASE_DIR / "data")))
DATABASE_URL = os.getenv("DATABASE_URL", "") or f"sqlite:///{DATA_DIR / 'gateway.sqlite3'}"
DATABASES = {"default": database_from_url(DATABASE_URL)}
# DATA_DIR holds all mail (SQLite), the password hashes, the DKIM and TLS private keys: only this user reads it.
private_directory(DATA_DIR)
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    _sqlite = Path(DATABASES["default"]["NAME"])
    if _sqlite.parent != DATA_DIR and not _sqlite.parent.exists():
        private_directory(_sqlite.parent)
    if str(_sqlite) != ":memory:":
        # Made 0600 before SQLite opens it: its -wal and -shm files take the database file's mode.
        for _path in (_sqlite, _sqlite.with_name(_sqlite.name + "-wal"), _sqlite.with_name(_sqlite.name + "-shm")):
            private_file(_path, create=_path == _sqlite)
    # The SMTP worker, the web UI and the embedded worker write the same file.
    DATABASES["default"]["OPTIONS"] = {"timeout": 20, "transaction_mode": "IMMEDIATE",
                                       "init_command": "PRAGMA journal_mode=WAL;"}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 10}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard"
LOGOUT_REDIRECT_URL = "login"
SESSION_COOKIE_AGE = envint("SESSION_COOKIE_AGE", str(8 * 3600))
SESSION_EXPIRE_AT_BROWSER_CLOSE = True
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SECURE = envbool("SECURE_COOKIES", "False")
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
# HTTPS (docs/security.md): off for `make run` over plain HTTP, on in docker-compose.yml, whose web service sits
# behind a TLS-terminating proxy. SECURE_PROXY_SSL_HEADER ("HTTP_X_FORWARDED_PROTO,https") names the header by
# which that proxy says the client came over HTTPS: set it only when every request passes the proxy, which sets
# the header itself.
SECURE_SSL_REDIRECT = envbool("SECURE_SSL_REDIRECT", "False")
SECURE_HSTS_SECONDS = envint("SECURE_HSTS_SECONDS", "0")
SECURE_HSTS_INCLUDE_SUBDOMAINS = envbool("SECURE_HSTS_INCLUDE_SUBDOMAINS", "False")
SECURE_HSTS_PRELOAD = envbool("SECURE_HSTS_PRELOAD", "False")
_proxy_ssl_header = envlist("SECURE_PROXY_SSL_HEADER", "")
if _proxy_ssl_header:
    if len(_proxy_ssl_header) != 2 or not _proxy_ssl_header[0].startswith("HTTP_"):
        raise ImproperlyConfigured('SECURE_PROXY_SSL_HEADER: write "HTTP_X_FORWARDED_PROTO,https" (header, value)')
    SECURE_PROXY_SSL_HEADER = (_proxy_ssl_header[0], _proxy_ssl_header[1])
# The reverse proxies whose X-Forwarded-For names the client (the audit log, the login throttle); empty: none,
# REMOTE_ADDR is the client.
TRUSTED_PROXIES = envlist("TRUSTED_PROXIES", "")
# The login throttle every door shares (site, admin, SMTP AUTH, API tokens; gateway/throttle.py): failures
# counted per username and IP, per username, per IP; each limit locks its key until LOGIN_THROTTLE_WINDOW
# seconds after its last failure. 0 turns a limit off.
AUTHENTICATION_BACKENDS = ["gateway.throttle.ThrottledModelBackend"]
LOGIN_THROTTLE_WINDOW = envint("LOGIN_THROTTLE_WINDOW", str(15 * 60))
LOGIN_THROTTLE_PAIR_FAILURES = envint("LOGIN_THROTTLE_PAIR_FAILURES", "5")
LOGIN_THROTTLE_USERNAME_FAILURES = envint("LOGIN_THROTTLE_USERNAME_FAILURES", "20")
LOGIN_THROTTLE_IP_FAILURES = envint("LOGIN_THROTTLE_IP_FAILURES", "30")
# Two-factor login (TOTP; console/twofactor.py, docs/security.md). Optional for everyone; with
# TWO_FACTOR_REQUIRED_FOR_ADMINS an administrator without an authenticator is sent to set one up after the
# password and reaches nothing else before. The second step of a login waits TWO_FACTOR_PENDING_SECONDS for its
# code; TWO_FACTOR_ISSUER is the name the authenticator app shows.
TWO_FACTOR_REQUIRED_FOR_ADMINS = envbool("TWO_FACTOR_REQUIRED_FOR_ADMINS", "False")
TWO_FACTOR_PENDING_SECONDS = envint("TWO_FACTOR_PENDING_SECONDS", "300")
TWO_FACTOR_ISSUER = os.getenv("TWO_FACTOR_ISSUER", PRODUCT_NAME)
# SMTP AUTH cannot ask for a code: it takes the password alone, or, with this, refuses a login that has
# two-factor login set up (gateway/smtp/login.py).
TWO_FACTOR_REFUSE_SMTP_AUTH = envbool("TWO_FACTOR_REFUSE_SMTP_AUTH", "False")
OTP_TOTP_ISSUER = TWO_FACTOR_ISSUER
# django_otp's own back-off per device is off: a wrong code counts in the login throttle above, the one count
# of every door, and its words ("Too many failed logins ...") are the ones the login pages show.
OTP_TOTP_THROTTLE_FACTOR = 0
# The Django admin of the devices does not show their secrets (nor their QR codes) to other administrators.
OTP_ADMIN_HIDE_SENSITIVE_DATA = True

SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"

LANGUAGE_CODE = "en-us"
TIME_ZONE = os.getenv("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = DATA_DIR / "static"

# The cache (login throttling, page fragments) must be shared by all web processes: Redis when
# CACHE_URL is set, else the Celery broker when it is Redis (so that every node shares one login throttle,
# keys under "mailgate:"), else files in DATA_DIR (one machine).
CACHE_URL = os.getenv("CACHE_URL", "")
_broker_redis = os.getenv("CELERY_BROKER_URL", "") if os.getenv("CELERY_BROKER_URL", "").startswith(
    ("redis://", "rediss://")) else ""
CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": CACHE_URL or _broker_redis,
                **({} if CACHE_URL else {"KEY_PREFIX": "mailgate"})}
    if CACHE_URL or _broker_redis else
    {"BACKEND": "django.core.cache.backends.filebased.FileBasedCache", "LOCATION": str(DATA_DIR / "cache")}
}

# --- Tasks -----------------------------------------------------------------------------------
# With a broker, Celery workers run scan / deliver / release and beat runs the sweeper.
# Without one, `manage.py runworker` (started by `make run`) takes the due work from the
# database itself; nothing is lost either way, since every step's state is a row.
CELERY_BROKER_URL = os.getenv("CELERY_BROKER_URL", "")
CELERY_RESULT_BACKEND = None
CELERY_TASK_ALWAYS_EAGER = envbool("CELERY_TASK_ALWAYS_EAGER", "False")
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_IGNORE_RESULT = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3600}
if CELERY_BROKER_URL.startswith("redis://"):
    # kombu's Redis transport, keeping one Redis client per channel (see the module).
    CELERY_BROKER_TRANSPORT = "appliance.redis_transport:Transport"
    # No copy of each task in Redis's "unacked" set while it runs (two MULTI/EXEC round trips per task,
    # ~1 ms of the worker's CPU per message). The rows are the truth: what a worker that died was holding
    # is taken up by the sweeper from the rows' states; a worker that stops cleanly still puts back what
    # it had not started. See docs/decisions.md ("A task is not kept in Redis while it runs").
    CELERY_BROKER_TRANSPORT_OPTIONS["ack_emulation"] = envbool("CELERY_REDIS_ACK_EMULATION", "False")
# Celery's Django fix-up closes every database connection around every task unless this is set: a new
# PostgreSQL backend per task. Connections are kept instead; appliance/celery.py still drops old or
# broken ones before each task (CONN_MAX_AGE, CONN_HEALTH_CHECKS).
CELERY_DB_REUSE_MAX = envint("CELERY_DB_REUSE_MAX", "1000000")
# The SMTP server's and the workers' threads run under SCHED_BATCH: they do not preempt the scanners
# when they wake up (appliance/scheduling.py).
MAIL_SCHED_BATCH = envbool("MAIL_SCHED_BATCH", "True")
# The Celery worker's (and runworker's) commits do not wait for the disk flush; the SMTP server's do.
WORKER_SYNCHRONOUS_COMMIT = envbool("WORKER_SYNCHRONOUS_COMMIT", "False")
# The few UPDATEs every message takes (gateway/db/) run as server-side prepared statements on
# PostgreSQL; off for a transaction-mode connection pooler that cannot keep prepared statements.
DB_PREPARED_STATEMENTS = envbool("DB_PREPARED_STATEMENTS", "True")
CELERY_BEAT_SCHEDULE = {
    "sweep": {"task": "gateway.tasks.sweep", "schedule": envfloat("SWEEP_INTERVAL", "60")},
    "rollup": {"task": "reports.tasks.rollup", "schedule": envfloat("ROLLUP_INTERVAL", "60")},
    "housekeeping": {"task": "gateway.tasks.housekeeping", "schedule": 3600.0},
}

# Releasing a virus from the quarantine is for administrators; this lets domain administrators too.
DOMAIN_ADMINS_RELEASE_VIRUSES = envbool("DOMAIN_ADMINS_RELEASE_VIRUSES", "False")

# Seconds a process keeps the mail-flow settings and the allow/block lists it read (saved changes are
# seen at once in the process that saved them, within this time elsewhere).
CONFIG_CACHE_SECONDS = envfloat("CONFIG_CACHE_SECONDS", "10")

# --- Scanners --------------------------------------------------------------------------------
# Unset means that scan is off: the UI and the log say so on every message.
SPAMD_URL = os.getenv("SPAMD_URL", "")  # tcp://127.0.0.1:783
CLAMD_URL = os.getenv("CLAMD_URL", "")  # unix:///run/clamav/clamd.ctl or tcp://127.0.0.1:3310
SCANNER_TIMEOUT = envfloat("SCANNER_TIMEOUT", "60")
# A message larger than this is not sent to spamd (as spamc's own 500 KB default).
SPAMD_MAX_SIZE = envint("SPAMD_MAX_SIZE", str(512 * 1024))
# What clamd accepts in one INSTREAM (its StreamMaxLength; 25M in Debian's clamd.conf). A message, MIME part
# or archive member larger than this cannot be scanned: the message is unscannable, never delivered unchecked.
CLAMD_STREAM_MAX_LENGTH = envint("CLAMD_STREAM_MAX_LENGTH", str(25 * 1024 * 1024))
# The limits of the gateway's own reading of a message (docs/security-scanning.md). Reaching one makes the
# message unscannable (held by MailFlowSettings.action_unscannable, quarantine by default).
SCAN_MAX_PARTS = envint("SCAN_MAX_PARTS", "1000")  # MIME parts, containers included
SCAN_MAX_DEPTH = envint("SCAN_MAX_DEPTH", "50")  # multipart and message/rfc822 nesting
SCAN_MAX_ARCHIVE_MEMBERS = envint("SCAN_MAX_ARCHIVE_MEMBERS", "2000")  # per archive
SCAN_MAX_ARCHIVE_DEPTH = envint("SCAN_MAX_ARCHIVE_DEPTH", "3")  # an archive in an archive in an archive
SCAN_MAX_DECOMPRESSED_BYTES = envint("SCAN_MAX_DECOMPRESSED_BYTES", str(100 * 1024 * 1024))  # per message
SCAN_MAX_COMPRESSION_RATIO = envint("SCAN_MAX_COMPRESSION_RATIO", "100")  # per archive member over 1 MiB

# --- SMTP --------------------------------------------------------------------------------------
SMTP_LISTEN = os.getenv("SMTP_LISTEN", "127.0.0.1:2525")
SMTP_MAX_CONNECTIONS = envint("SMTP_MAX_CONNECTIONS", "500")
SMTP_DATA_TIMEOUT = envint("SMTP_TIMEOUT", "300")
# Message data beyond this many bytes per connection is spooled to an unlinked file in SMTP_SPOOL_DIR
# while it arrives; at most SMTP_DATA_MEMORY bytes of message data are held in memory at once (to be
# checked and stored: twice a message's size each), the next message waiting its turn (gateway/smtp/data.py).
SMTP_DATA_SPOOL_THRESHOLD = envint("SMTP_DATA_SPOOL_THRESHOLD", str(256 * 1024))
SMTP_DATA_MEMORY = envint("SMTP_DATA_MEMORY", str(128 * 1024 * 1024))
SMTP_SPOOL_DIR = Path(os.getenv("SMTP_SPOOL_DIR", str(DATA_DIR / "spool")))
# Threads that write the mail log for the SMTP server (one database connection each).
SMTP_DB_THREADS = envint("SMTP_DB_THREADS", "8")
# Seconds the SMTP server keeps its snapshot of domains, trusted networks and limits.
SMTP_POLICY_TTL = envfloat("SMTP_POLICY_TTL", "15")
# Look up the client's reverse DNS name for the log and the Received header.
SMTP_REVERSE_DNS = envbool("SMTP_REVERSE_DNS", "True")
# Delivery: connect and command timeouts towards the routes' mail servers.
DELIVERY_TIMEOUT = envfloat("DELIVERY_TIMEOUT", "60")
# Retries: first after DELIVERY_RETRY_BASE seconds, doubling up to DELIVERY_RETRY_MAX.
DELIVERY_RETRY_BASE = envint("DELIVERY_RETRY_BASE", "60")
DELIVERY_RETRY_MAX = envint("DELIVERY_RETRY_MAX", "3600")
SCAN_RETRY_BASE = envint("SCAN_RETRY_BASE", "30")
SCAN_RETRY_MAX = envint("SCAN_RETRY_MAX", "900")
# A claim older than this (a worker that died mid-task) is handed back by the sweeper.
STALE_CLAIM_SECONDS = envint("STALE_CLAIM_SECONDS", "900")
# DNS for MX look-ups of outbound delivery (and, later, the SMTP-time checks).
DNS_NAMESERVERS = envlist("DNS_NAMESERVERS", "")
DNS_PORT = envint("DNS_PORT", "53")
DNS_TIMEOUT = envfloat("DNS_TIMEOUT", "5")

# --- SMTP policy, TLS and authentication (issue 3; docs/smtp-policy.md) ----------------------------
# What each check does (its action: off, log, score, tempfail, reject) and the DNSBL zones are in the
# database (SMTPPolicy, DNSBLZone: the admin or `manage.py smtppolicy`); these are the process's knobs.
# DNS-based checks (reverse DNS, DNSBL, HELO name, sender domain, SPF, DKIM, DMARC): "auto" runs them when
# a resolver is configured (DNS_NAMESERVERS, or nameservers in /etc/resolv.conf) and says "off" on every
# message otherwise; "true" always runs them (a dead resolver then answers 451 4.4.3); "false" never.
SMTP_DNS_CHECKS = os.getenv("SMTP_DNS_CHECKS", "auto").strip().lower()
# Greylisting on/off for this process (its delay and windows are in SMTPPolicy).
SMTP_GREYLISTING = envbool("SMTP_GREYLISTING", "True")
# Seconds a new client waits for the greeting; one that talks meanwhile is refused (early talker).
# A client that waited once is not made to wait again on this node for a day.
SMTP_GREET_DELAY = envfloat("SMTP_GREET_DELAY", "1")
# Seconds the SMTP server keeps DNS answers (positive and negative; never failures) and SPF results.
SMTP_DNS_CACHE_TTL = envfloat("SMTP_DNS_CACHE_TTL", "60")
# STARTTLS on the inbound port. Certificate and key (PEM); empty: a self-signed pair is made on the
# first start in DATA_DIR/tls (fine for `make run`; a real MX wants a real certificate).
SMTP_STARTTLS = envbool("SMTP_STARTTLS", "True")
SMTP_TLS_CERT = os.getenv("SMTP_TLS_CERT", "")
SMTP_TLS_KEY = os.getenv("SMTP_TLS_KEY", "")
# Mail submission for users' mail clients, with SMTP AUTH (PLAIN, LOGIN) against the appliance's users,
# offered only over TLS: HOST:PORT of the STARTTLS submission port (587) and of implicit TLS (465).
# Empty: not listened on. `runsmtp --submission/--smtps` override them.
SMTP_SUBMISSION_LISTEN = os.getenv("SMTP_SUBMISSION_LISTEN", "")
SMTP_SMTPS_LISTEN = os.getenv("SMTP_SMTPS_LISTEN", "")
# The per-IP limits of the SMTP server (connections, messages per minute, failed AUTH) counted for every node
# together, in Redis: by default the Celery broker when it is Redis; "off" for each node's own counts. A Redis
# that does not answer within SMTP_SHARED_LIMITS_TIMEOUT seconds leaves each node counting alone meanwhile.
_redis_broker = CELERY_BROKER_URL if CELERY_BROKER_URL.startswith(("redis://", "rediss://")) else ""
SMTP_SHARED_LIMITS_URL = os.getenv("SMTP_SHARED_LIMITS_URL", _redis_broker)
if SMTP_SHARED_LIMITS_URL.strip().lower() in ("off", "false", "none"):
    SMTP_SHARED_LIMITS_URL = ""
SMTP_SHARED_LIMITS_TIMEOUT = envfloat("SMTP_SHARED_LIMITS_TIMEOUT", "0.5")
# Recipient call-ahead (domains whose recipient check is "callahead"): timeout of the RCPT probe, and
# the MAIL FROM it uses (empty: the null sender <>, as a bounce would).
SMTP_CALLAHEAD_TIMEOUT = envfloat("SMTP_CALLAHEAD_TIMEOUT", "10")
SMTP_CALLAHEAD_SENDER = os.getenv("SMTP_CALLAHEAD_SENDER", "")
# The directories' recipient check (domains whose check is "ldap") asks from threads of its own, this many per
# SMTP server, each keeping its connection to each directory: a slow directory holds these, not the threads the
# other checks and SMTP AUTH share (docs/directory.md).
SMTP_DIRECTORY_THREADS = envint("SMTP_DIRECTORY_THREADS", "8")
# How often the web UI searches a logged-in directory (LDAP) account again: its role and addresses refreshed, its
# session ended when the directory no longer holds it (docs/directory.md).
DIRECTORY_RECHECK_SECONDS = envint("DIRECTORY_RECHECK_SECONDS", "900")

# --- Quarantine digests, their links, the account page (docs/configuration.md) ----------------------------
# Digests are sent from this address (one of our domains, so that they leave DKIM-signed) and name.
DIGEST_SENDER = os.getenv("DIGEST_SENDER", f"quarantine@{SMTP_HOSTNAME}")
DIGEST_SENDER_NAME = os.getenv("DIGEST_SENDER_NAME", "Quarantine report")
# The web UI's address as people reach it, for the links in digests (which no request tells).
SITE_URL = os.getenv("SITE_URL", "http://localhost:8000").rstrip("/")
# Days a digest's links work (never after the message leaves the quarantine).
DIGEST_LINK_DAYS = envint("DIGEST_LINK_DAYS", "14")
# The most messages one digest lists (the rest: "and N more", with a link to the quarantine).
DIGEST_MAX_ITEMS = envint("DIGEST_MAX_ITEMS", "200")
# How often beat looks for digests that are due (seconds); each one goes at its hour.
CELERY_BEAT_SCHEDULE["digests"] = {"task": "digests.tasks.send_due_digests",
                                   "schedule": envfloat("DIGEST_CHECK_INTERVAL", "300")}
# Whether users edit their own addresses and aliases on /account/ (else an administrator does).
ACCOUNT_EDIT_ADDRESSES = envbool("ACCOUNT_EDIT_ADDRESSES", "False")

# --- Running it: the mail queue, status, health and metrics (issue 16; docs/operations.md) ----------------
# A warning (DSN, Action: delayed) goes to the sender once per recipient still deferred this many hours after
# the message arrived; 0: no warnings.
DELAY_WARNING_HOURS = envfloat("DELAY_WARNING_HOURS", "4")
# A route whose last this many deliveries (the newest recipients sent to it) all failed shows as failing.
ROUTE_FAILING_AFTER = envint("ROUTE_FAILING_AFTER", "5")
# Seconds between the heartbeats of the SMTP server and the workers (their row on the status page, and
# their counters added to the database for /metrics).
HEARTBEAT_SECONDS = envfloat("HEARTBEAT_SECONDS", "15")
# /metrics answers a request with "Authorization: Bearer METRICS_TOKEN", or one from METRICS_ALLOW
# (addresses or networks; the client address as console.http.client_ip reads it). Neither: 403.
METRICS_TOKEN = os.getenv("METRICS_TOKEN", "")
METRICS_ALLOW = envlist("METRICS_ALLOW", "127.0.0.1,::1")
CELERY_BEAT_SCHEDULE["delay_warnings"] = {"task": "gateway.tasks.delay_warnings",
                                          "schedule": envfloat("DELAY_WARNING_INTERVAL", "300")}
# The mail log in Postfix's shape (gateway/maillog.py), besides the lines above: to syslog, facility mail, with
# LOG_SYSLOG (LOG_SYSLOG_ADDRESS: /dev/log, or HOST:PORT over UDP); to MAIL_LOG_FILE in syslog's format; else to
# standard error in that format.
LOG_SYSLOG = envbool("LOG_SYSLOG", "False")
LOG_SYSLOG_ADDRESS = os.getenv("LOG_SYSLOG_ADDRESS", "/dev/log")
MAIL_LOG_FILE = os.getenv("MAIL_LOG_FILE", "")
from gateway import maillog as _maillog  # noqa: E402 - a plain module: no model, no app registry

_mail_formatters, _mail_handlers = _maillog.handlers(
    syslog=LOG_SYSLOG, syslog_address_value=LOG_SYSLOG_ADDRESS, log_file=MAIL_LOG_FILE, node_name=NODE_NAME)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}, **_mail_formatters},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}, **_mail_handlers},
    "root": {"handlers": ["console"], "level": os.getenv("LOG_LEVEL", "INFO")},
    "loggers": {
        "mailgate": {"handlers": list(_mail_handlers), "level": "INFO", "propagate": False},
        "django.db.backends": {"level": "WARNING"},
        # Celery's two lines per task ("received", "succeeded in"), with task ids no one looks up: the
        # gateway logs each message's scan and delivery itself. A failed task is still logged (ERROR).
        "celery.worker.strategy": {"level": "WARNING"},
        "celery.app.trace": {"level": "WARNING"},
    },
}
