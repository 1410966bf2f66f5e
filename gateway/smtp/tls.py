"""TLS for the SMTP server: the configured certificate, or a self-signed one made on the first start.

`SMTP_TLS_CERT` / `SMTP_TLS_KEY` name PEM files. When they are empty a self-signed certificate for
`SMTP_HOSTNAME` is generated once into DATA_DIR/tls (key readable by its owner only), so that `make run`
offers STARTTLS with nothing configured. Senders on the internet do not verify an MX's certificate
(RFC 7435, opportunistic TLS), but a real MX should still have a real one (e.g. from Let's Encrypt).
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import ssl
import tempfile
from pathlib import Path

from django.conf import settings

log = logging.getLogger(__name__)


def self_signed_paths() -> tuple[Path, Path]:
    directory = Path(settings.DATA_DIR) / "tls"
    return directory / "smtp-selfsigned.crt", directory / "smtp-selfsigned.key"


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def generate_self_signed(hostname: str, cert_path: Path, key_path: Path, days: int = 3650) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64] or "localhost")])
    alt_names: list[x509.GeneralName] = [x509.DNSName(hostname or "localhost")]
    try:
        alt_names = [x509.IPAddress(ipaddress.ip_address(hostname))]
    except ValueError:
        pass
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_atomically(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()), 0o600)
    _write_atomically(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def certificate_paths() -> tuple[Path, Path]:
    """The configured certificate and key, or the self-signed pair (made now if missing)."""
    if settings.SMTP_TLS_CERT:
        return Path(settings.SMTP_TLS_CERT), Path(settings.SMTP_TLS_KEY or settings.SMTP_TLS_CERT)
    cert, key = self_signed_paths()
    if not (cert.exists() and key.exists()):
        log.warning("SMTP_TLS_CERT is not set: generating a self-signed certificate for %s in %s",
                    settings.SMTP_HOSTNAME, cert.parent)
        generate_self_signed(settings.SMTP_HOSTNAME, cert, key)
    return cert, key


def server_context() -> ssl.SSLContext:
    """The server side TLS context (TLS 1.2 or later); raises OSError/ssl.SSLError for unusable files."""
    cert, key = certificate_paths()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert), str(key))
    return context


def reload_certificate(context: ssl.SSLContext) -> Path:
    """Load the certificate and key again into the context every listener shares (SIGHUP, after an ACME client
    renewed them): handshakes from now on present the new pair; a connection already encrypted keeps the one
    it agreed on (OpenSSL copies the certificate into each connection). Raises OSError/ssl.SSLError/ValueError,
    leaving the context as it was, when the new files are unusable (missing, unreadable, a key that does not
    match): a renewal gone wrong must not take TLS away.

    The two files are read once and checked in a context of their own before the shared one takes them from
    the same bytes: a renewal that rewrites the files meanwhile cannot hand the shared context a certificate
    with the previous key. Returns the certificate's path.
    """
    cert, key = certificate_paths()
    cert_pem, key_pem = cert.read_bytes(), key.read_bytes()
    if b"-----BEGIN" not in cert_pem or b"-----BEGIN" not in key_pem:
        raise ValueError(f"{cert} or {key} holds no PEM data")
    directory = Path(settings.DATA_DIR) / "tls"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix="reload.") as scratch:
        copy_cert, copy_key = Path(scratch) / "cert.pem", Path(scratch) / "key.pem"
        _write_atomically(copy_cert, cert_pem, 0o600)
        _write_atomically(copy_key, key_pem, 0o600)
        trial = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        trial.load_cert_chain(str(copy_cert), str(copy_key))
        context.load_cert_chain(str(copy_cert), str(copy_key))
    return cert
