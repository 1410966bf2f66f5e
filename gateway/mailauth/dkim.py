"""DKIM (RFC 6376; ed25519 RFC 8463; RFC 8301 algorithm rules) on dkimpy, keys looked up through gateway.mailauth.dns.

Public API::

    verify(message: bytes, resolver=None, *, minkey=1024) -> list[DKIMSignatureResult]
    async verify_async(message, resolver=None, **options) -> list[DKIMSignatureResult]
    sign(message: bytes, domain, selector, private_key_pem, algorithm='rsa-sha256', headers=None,
         *, canonicalize=('relaxed', 'relaxed'), identity=None) -> bytes
    generate_key(algorithm='rsa-sha256', bits=2048) -> (private_pem: str, dns_txt_value: str)
    key_record_name(selector, domain) -> str                  # "<selector>._domainkey.<domain>"
    zone_file_entry(selector, domain, txt_value) -> str       # BIND line, TXT split into 255-octet strings

`verify` checks every DKIM-Signature of a message, top to bottom, and returns one result each (an unsigned message
gives ``[]``). The result words are RFC 8601's, chosen so:

- ``pass``: the signature verifies with the published key.
- ``fail``: body hash or signature mismatch (the message was changed, or signed with another key).
- ``neutral``: the signature cannot be evaluated: tag syntax errors, unknown or forbidden algorithm (rsa-sha1,
  RFC 8301 §3.1), bad canonicalization, expired (x=) or dated in the future (t=), i= outside d=.
- ``permerror``: the key is the problem: no key record (NXDOMAIN or no TXT), revoked (empty p=), unparsable, of
  another algorithm than the signature's, shorter than ``minkey`` bits (RFC 8301 §3.2: 1024).
- ``temperror``: the key lookup failed temporarily (timeout, SERVFAIL): try again later.

dkimpy's own ``verify()`` returns a bare bool and folds DNS timeouts into False, so the per-signature steps are
driven here with dkimpy's parts (``verify_headerprep``, ``load_pk_from_dns``, ``verify_sig_process``; dkimpy is
pinned, see requirements.txt).

Signing: ``sign`` returns the ``DKIM-Signature: ...`` header field, line ending included, to prepend to the message
unchanged. RSA keys are PEM (PKCS#1 or PKCS#8); ed25519 keys PEM (PKCS#8) or dkimpy's base64 of the 32-byte seed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
from dataclasses import dataclass

import dkim as dkimpy
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dkim.util import InvalidTagValueList, parse_tag_value

from gateway.mailauth.dns import Resolver, SyncResolver, TemporaryDNSError, get_sync_resolver

__all__ = [
    "DKIMSignatureResult",
    "generate_key",
    "key_record_name",
    "sign",
    "verify",
    "verify_async",
    "zone_file_entry",
]

logger = logging.getLogger(__name__)

ALGORITHMS = ("rsa-sha256", "ed25519-sha256")
MIN_RSA_BITS = 1024  # RFC 8301 §3.2: verifiers MUST NOT accept shorter keys
DEFAULT_RSA_BITS = 2048


@dataclass(frozen=True)
class DKIMSignatureResult:
    """The outcome of one DKIM-Signature header field."""

    result: str  # pass | fail | neutral | temperror | permerror
    domain: str  # d=
    selector: str  # s=
    algorithm: str  # a=
    reason: str  # why, in words ("" for pass)
    identity: str = ""  # i= (defaults to "@" + d=)
    header_b: str = ""  # the first 8 characters of b=, RFC 6008's header.b for Authentication-Results
    key_bits: int | None = None
    body_length: int | None = None  # l=, when the signature covers only part of the body

    @property
    def passed(self) -> bool:
        return self.result == "pass"


def _text(value: bytes | None) -> str:
    return value.decode("ascii", errors="replace") if value else ""


def _strip_mbox_line(message: bytes) -> bytes:
    # Messages saved in mbox files start with a "From sender date" line, which is not a header field.
    if message.startswith(b"From "):
        return message.split(b"\n", 1)[1] if b"\n" in message else b""
    return message


def _dnsfunc(resolver: SyncResolver):
    def lookup(name: bytes | str, timeout: float = 5) -> bytes | None:
        if isinstance(name, bytes):
            try:
                name = name.decode("ascii")
            except UnicodeDecodeError:
                return None  # not a DNS name: no key can exist there
        # Several TXT records at a key name are undefined (RFC 6376 §3.6.2.2); use the first, as dkimpy does.
        records = resolver.lookup_txt_bytes(name)
        return records[0] if records else None

    return lookup


def _tags(header_value: bytes) -> dict[bytes, bytes]:
    try:
        return parse_tag_value(header_value)
    except (InvalidTagValueList, ValueError):
        return {}


def _result(outcome: str, tags: dict[bytes, bytes], reason: str, key_bits: int | None = None) -> DKIMSignatureResult:
    domain = _text(tags.get(b"d")).lower()
    body_length = tags.get(b"l")
    b_value = re.sub(rb"\s+", b"", tags.get(b"b", b""))
    return DKIMSignatureResult(
        result=outcome,
        domain=domain,
        selector=_text(tags.get(b"s")),
        algorithm=_text(tags.get(b"a")).lower(),
        reason=reason,
        identity=_text(tags.get(b"i")) or (f"@{domain}" if domain else ""),
        header_b=_text(b_value[:8]),
        key_bits=key_bits,
        body_length=int(body_length) if body_length and body_length.isdigit() else None,
    )


def _verify_one(message: bytes, index: int, dnsfunc, minkey: int, timeout: float) -> DKIMSignatureResult:
    verifier = dkimpy.DKIM(message, logger=logger, minkey=minkey, timeout=timeout)
    raw = [value for name, value in verifier.headers if name.lower() == b"dkim-signature"][index]
    tags = _tags(raw)
    try:
        prepared = verifier.verify_headerprep(index)
    except dkimpy.DKIMException as exc:
        return _result("neutral", tags, f"signature unusable: {exc}")
    sig, include_headers, sigheaders = prepared
    algorithm = sig[b"a"].lower()
    if algorithm not in (a.encode() for a in ALGORITHMS):
        return _result("neutral", tags, f"algorithm {algorithm.decode()} not accepted (RFC 8301)")
    name = sig[b"s"] + b"._domainkey." + sig[b"d"] + b"."
    try:
        verifier.pk, verifier.keysize, verifier.ktag, verifier.seqtlsrpt = dkimpy.load_pk_from_dns(
            name, dnsfunc, timeout=timeout
        )
    except TemporaryDNSError as exc:
        return _result("temperror", tags, f"key lookup failed: {exc.reason}")
    except (dkimpy.KeyFormatError, binascii.Error, dkimpy.UnknownKeyTypeError) as exc:
        reason = str(exc)
        if reason.startswith("missing public key"):
            reason = "no key for signature"
        else:
            # An empty p= (a revoked key) lands here too: dkimpy cannot parse an empty key.
            reason = f"key unusable (revoked or malformed): {reason}"
        return _result("permerror", tags, reason)
    if verifier.pk is None:
        return _result("permerror", tags, "key is not for e-mail (s= service type)")
    if not algorithm.startswith(verifier.ktag):
        return _result(
            "permerror", tags, f"key type {verifier.ktag.decode()} does not match {algorithm.decode()}"
        )
    try:
        valid = verifier.verify_sig_process(sig, include_headers, sigheaders[index], dnsfunc)
    except dkimpy.KeyFormatError as exc:
        return _result("permerror", tags, str(exc), verifier.keysize)
    except dkimpy.ValidationError as exc:
        if str(exc).startswith("body hash mismatch"):
            return _result("fail", tags, "body hash did not verify", verifier.keysize)
        return _result("neutral", tags, str(exc), verifier.keysize)
    except dkimpy.DKIMException as exc:
        return _result("neutral", tags, str(exc), verifier.keysize)
    if not valid:
        return _result("fail", tags, "signature did not verify", verifier.keysize)
    return _result("pass", tags, "", verifier.keysize)


def verify(
    message: bytes, resolver: Resolver | SyncResolver | None = None, *, minkey: int = MIN_RSA_BITS
) -> list[DKIMSignatureResult]:
    """Verify every DKIM-Signature of ``message`` (raw RFC 5322 bytes, CRLF or LF line ends), top first.

    Blocks on DNS: from asyncio use `verify_async`.
    """
    sync_resolver = (resolver or get_sync_resolver()).sync()
    message = _strip_mbox_line(message)
    try:
        headers = dkimpy.DKIM(message, logger=logger).headers
    except dkimpy.DKIMException as exc:
        head = message.split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0].lower()
        if b"dkim-signature:" in head:
            return [_result("permerror", {}, f"message could not be parsed: {exc}")]
        return []
    count = sum(1 for name, _ in headers if name.lower() == b"dkim-signature")
    dnsfunc = _dnsfunc(sync_resolver)
    return [_verify_one(message, index, dnsfunc, minkey, sync_resolver.timeout) for index in range(count)]


async def verify_async(
    message: bytes, resolver: Resolver | SyncResolver | None = None, **options: int
) -> list[DKIMSignatureResult]:
    """`verify` in a worker thread, so an event loop is not blocked by key lookups or RSA."""
    return await asyncio.to_thread(verify, message, resolver, **options)


def _normalise_algorithm(algorithm: str) -> str:
    algorithm = algorithm.lower()
    aliases = {"rsa": "rsa-sha256", "ed25519": "ed25519-sha256"}
    algorithm = aliases.get(algorithm, algorithm)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"DKIM algorithm must be one of {', '.join(ALGORITHMS)}, not {algorithm!r}")
    return algorithm


def _signing_key(private_key: str | bytes, algorithm: str) -> bytes:
    """The key in the form dkimpy signs with: PKCS#1 PEM for RSA, base64 of the 32-byte seed for ed25519."""
    data = private_key.encode("ascii") if isinstance(private_key, str) else private_key
    if algorithm == "ed25519-sha256" and b"-----BEGIN" not in data:
        return data.strip()  # already dkimpy's base64 seed
    key = serialization.load_pem_private_key(data, password=None)
    if algorithm == "ed25519-sha256":
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ValueError("ed25519-sha256 needs an Ed25519 private key")
        seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
        return base64.b64encode(seed)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("rsa-sha256 needs an RSA private key")
    if key.key_size < MIN_RSA_BITS:
        raise ValueError(f"RSA key of {key.key_size} bits: receivers reject keys under {MIN_RSA_BITS} (RFC 8301)")
    # dkimpy reads PKCS#1 ("BEGIN RSA PRIVATE KEY") only; convert whatever PEM we were given.
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def sign(
    message: bytes,
    domain: str,
    selector: str,
    private_key_pem: str | bytes,
    algorithm: str = "rsa-sha256",
    headers: list[str] | None = None,
    *,
    canonicalize: tuple[str, str] = ("relaxed", "relaxed"),
    identity: str | None = None,
) -> bytes:
    """The ``DKIM-Signature`` header field (with its line ending) signing ``message`` for ``domain``.

    ``headers``: the header field names to sign (From is required); default: dkimpy's list of RFC 6376 §5.4.1
    recommended fields, From signed once more than present so a second From cannot be added. Relaxed/relaxed
    canonicalization by default: it survives the re-folding and whitespace changes of relays.
    Raises ValueError for a wrong key or algorithm, and dkim.DKIMException for a message that cannot be signed.
    """
    algorithm = _normalise_algorithm(algorithm)
    key = _signing_key(private_key_pem, algorithm)
    message = _strip_mbox_line(message)
    linesep = b"\r\n" if b"\r\n" in message else b"\n"
    signer = dkimpy.DKIM(message, logger=logger, linesep=linesep)
    include = [h.encode("ascii").lower() for h in headers] if headers is not None else None
    if include is None and _has_field(message, b"list-unsubscribe-post"):
        # RFC 8058 §4: the one-click unsubscription fields must be signed; dkimpy's default list lacks this one.
        include = signer.default_sign_headers() + [b"list-unsubscribe-post"]
    return signer.sign(
        selector.encode("ascii"),
        domain.encode("idna"),
        key,
        signature_algorithm=algorithm.encode("ascii"),
        identity=identity.encode("ascii") if identity else None,
        canonicalize=(canonicalize[0].encode("ascii"), canonicalize[1].encode("ascii")),
        include_headers=include,
    )


def _has_field(message: bytes, name: bytes) -> bool:
    head = message.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    return any(line.split(b":", 1)[0].strip().lower() == name for line in head.splitlines()
               if line[:1] not in (b" ", b"\t"))


def generate_key(algorithm: str = "rsa-sha256", bits: int = DEFAULT_RSA_BITS) -> tuple[str, str]:
    """A new signing key: (private key PEM, the TXT record value to publish at `key_record_name`).

    RSA: ``bits`` (2048 by default), PKCS#1 PEM, ``p=`` the DER SubjectPublicKeyInfo (RFC 6376 §3.6.1).
    ed25519: PKCS#8 PEM, ``p=`` the bare 32-byte public key in base64 (RFC 8463 §4).
    """
    algorithm = _normalise_algorithm(algorithm)
    if algorithm == "ed25519-sha256":
        private = ed25519.Ed25519PrivateKey.generate()
        pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return pem.decode("ascii"), f"v=DKIM1; k=ed25519; p={base64.b64encode(public).decode('ascii')}"
    if bits < MIN_RSA_BITS:
        raise ValueError(f"RSA keys under {MIN_RSA_BITS} bits are rejected by receivers (RFC 8301)")
    private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    public = private.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem.decode("ascii"), f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode('ascii')}"


def key_record_name(selector: str, domain: str) -> str:
    """Where the public key is published: ``<selector>._domainkey.<domain>`` (RFC 6376 §3.6.2.1)."""
    return f"{selector}._domainkey.{domain.rstrip('.')}"


def zone_file_entry(selector: str, domain: str, txt_value: str) -> str:
    """A zone file line publishing ``txt_value``; split into strings of at most 255 octets, the TXT limit."""
    chunks = [txt_value[i:i + 255] for i in range(0, len(txt_value), 255)] or [""]
    strings = " ".join(f'"{chunk}"' for chunk in chunks)
    return f"{key_record_name(selector, domain)}. IN TXT ( {strings} )"
