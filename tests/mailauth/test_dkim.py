"""DKIM: the dkimpy and authheaders vectors verify as expected; what we sign verifies elsewhere.

Keys are served by the DNS stub. The independent verifier is Perl's Mail::DKIM (Debian libmail-dkim-perl),
pointed at the stub through Net::DNS. When it is missing the tests that need it skip, except under CI (env CI
set, not 0/false), where they fail. Debian 12's Mail::DKIM has no ed25519, so ed25519 interop rests on the
Exim- and RFC 8463-signed vectors, which we verify.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
from pathlib import Path

import dkim as dkimpy
import nacl.signing
import pytest

from gateway.mailauth import dkim
from gateway.mailauth.dns import SyncResolver
from tests.support.dnsstub import DNSStub

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "auth" / "dkim"
DKIMPY = CORPUS / "dkimpy-1.1.8"
AUTHHEADERS = CORPUS / "authheaders-0.16.3"


def read(path: Path) -> bytes:
    return path.read_bytes()


def key_txt(path: Path) -> str:
    return read(path).decode("ascii").strip()


def rfc8463_public_key() -> str:
    # RFC 8463's example key (brisbane._domainkey.football.example.com) is RFC 8032 §7.1 test 1, whose secret key
    # dkimpy ships as rfc8032_7_1.key: derive the public half instead of copying it.
    seed = base64.b64decode(read(DKIMPY / "rfc8032_7_1.key").strip())
    return base64.b64encode(bytes(nacl.signing.SigningKey(seed).verify_key)).decode("ascii")


def ed25519test_public_key() -> str:
    return key_txt(DKIMPY / "ed25519test.dns")


# gmail.com's 2012 key, as published then; dkimpy's own test uses it for its test2.message vector.
GMAIL_2012 = (
    "k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA1Kd87/UeJjenpabgbFwh+eBCsSTrqmwIYYvywlbhbqoo2DymndFkbjOVIPI"
    "ldNs/m40KF+yzMn1skyoxcTUGCQs8g3FgD2Ap3ZB5DekAo5wMmk4wimDO+U8QzI3SD07y2+07wlNWwIt8svnxgdxGkVbbhzY8i+RQ9DpSVpPbF7"
    "ykQxtKXkv/ahW3KjViiAH+ghvvIhkx4xYSIc9oSwVmAl5OctMEeWUwg8Istjqz8BZeTWbf41fbNhte7Y+YqZOwq1Sd0DbvYAD9NOZK9vlfuac05"
    "98HY+vtSBczUiKERHv1yRbcaQtZFh5wtiRrN04BLUTD21MycBX5jYchHjPY/wIDAQAB"
)


def txt(value: str) -> dict:
    """A TXT entry, split into character-strings of at most 255 octets as a real zone would hold it."""
    return {"TXT": [value[i:i + 255] for i in range(0, len(value), 255)]}


def vector_zones() -> dict:
    test_key = key_txt(DKIMPY / "test.txt")
    return {
        "test._domainkey.football.example.com": [txt(test_key)],
        "brisbane._domainkey.football.example.com": [txt(f"v=DKIM1; k=ed25519; p={rfc8463_public_key()}")],
        "test._domainkey.example.com": [txt(test_key)],
        "test._domainkey.example.biz": [txt(test_key)],
        "20120113._domainkey.gmail.com": [txt(GMAIL_2012)],
        "sed._domainkey.test.ex": [txt(key_txt(DKIMPY / "eximtest.dns"))],
        # 2007-00._domainkey.kitterman.com is deliberately absent: message.mbox has no published key here.
    }


# (file, expected result per signature, top first). Why each is what it is:
VECTORS = [
    # RFC 6376's example message signed twice, ed25519 (RFC 8463 A.3) and RSA.
    (DKIMPY / "rfc6376.signed.msg", ["pass", "pass"]),
    (DKIMPY / "rfc6376.signed.rsa.msg", ["pass"]),
    # Same signature with t= removed and x= added after signing: the signature header itself is signed.
    (DKIMPY / "rfc6376.signed.no_t.msg", ["fail"]),
    # Exim's ed25519 signature (RFC 8463 interop).
    (DKIMPY / "ed25519test2.msg", ["pass"]),
    # A gmail.com signature with degenerate (legal) folding, Debian bug #711751.
    (DKIMPY / "test2.message", ["pass"]),
    # d= with a "(" in it: not a domain name; the signature cannot be evaluated.
    (DKIMPY / "test.message.baddomain", ["neutral"]),
    # A real 2011 signature whose key is not published here: no key for signature.
    (DKIMPY / "message.mbox", ["permerror"]),
    (AUTHHEADERS / "test.message_signed", ["pass"]),
    # A display name with a comma, quoted: From is unchanged, so it verifies.
    (AUTHHEADERS / "testcomma.message", ["pass"]),
    # authheaders' DMARC fixtures: From (and d=) edited after signing, so each signature fails.
    (AUTHHEADERS / "test.message_sub", ["fail"]),
    (AUTHHEADERS / "test.message_multi", ["fail"]),
    (AUTHHEADERS / "test.message_multi2", ["fail"]),
    (AUTHHEADERS / "test.message_np1", ["fail"]),
    (AUTHHEADERS / "test.message_np2", ["fail"]),
    # Unsigned messages: no results at all.
    (DKIMPY / "test.message", []),
    (DKIMPY / "rfc6376.msg", []),
    (AUTHHEADERS / "test.message", []),
]


@pytest.fixture
def stub(dns_stub: DNSStub) -> DNSStub:
    dns_stub.set_zones(vector_zones())
    return dns_stub


@pytest.fixture
def resolver(stub: DNSStub) -> SyncResolver:
    return SyncResolver(nameservers=[stub.host], port=stub.port, timeout=0.5)


@pytest.mark.parametrize(("path", "expected"), [pytest.param(p, e, id=p.name) for p, e in VECTORS])
def test_vectors(path: Path, expected: list[str], resolver: SyncResolver) -> None:
    results = dkim.verify(read(path), resolver)
    assert [r.result for r in results] == expected, [r.reason for r in results]


def test_vector_details(resolver: SyncResolver) -> None:
    ed, rsa = dkim.verify(read(DKIMPY / "rfc6376.signed.msg"), resolver)
    assert (ed.domain, ed.selector, ed.algorithm, ed.key_bits) == ("football.example.com", "brisbane",
                                                                  "ed25519-sha256", 256)
    assert (rsa.domain, rsa.selector, rsa.algorithm, rsa.key_bits) == ("football.example.com", "test",
                                                                      "rsa-sha256", 1024)
    assert rsa.identity == "@football.example.com" and len(rsa.header_b) == 8 and rsa.reason == ""
    (missing,) = dkim.verify(read(DKIMPY / "message.mbox"), resolver)
    assert missing.reason == "no key for signature" and missing.domain == "kitterman.com"


# --- key problems, with the key record changed under a fixed signature -------------------------------------------


@pytest.mark.parametrize(
    ("record", "expected", "reason"),
    [
        pytest.param(None, "permerror", "no key for signature", id="no-key"),
        pytest.param("v=DKIM1; k=rsa; p=", "permerror", "revoked", id="revoked"),
        pytest.param(key_txt(DKIMPY / "badversion.txt"), "permerror", "", id="bad-version"),
        pytest.param(key_txt(DKIMPY / "test_bad.txt"), "permerror", "", id="corrupt-key"),
        pytest.param(key_txt(DKIMPY / "badk.txt"), "permerror", "", id="unknown-k"),
        pytest.param(f"v=DKIM1; k=ed25519; p={ed25519test_public_key().split('p=')[-1]}", "permerror",
                     "does not match", id="key-type-mismatch"),
        pytest.param(key_txt(DKIMPY / "1024_testkey_wo_markers.pub.txt"), "fail", "did not verify", id="other-key"),
        pytest.param(key_txt(DKIMPY / "test2.txt"), "pass", "", id="implicit-k-rsa"),
        pytest.param("TIMEOUT", "temperror", "timeout", id="dns-timeout"),
    ],
)
def test_key_record_outcomes(record: str | None, expected: str, reason: str, stub: DNSStub,
                             resolver: SyncResolver) -> None:
    zones = vector_zones()
    name = "test._domainkey.football.example.com"
    if record is None:
        del zones[name]
    else:
        zones[name] = ["TIMEOUT"] if record == "TIMEOUT" else [txt(record)]
    stub.set_zones(zones)
    (result,) = dkim.verify(read(DKIMPY / "rfc6376.signed.rsa.msg"), resolver)
    assert result.result == expected and reason in result.reason, result.reason


# --- signing ---------------------------------------------------------------------------------------------------

MESSAGE = (
    b"From: Alice Example <alice@example.com>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: DKIM from the gateway\r\n"
    b"Date: Tue, 01 Dec 2026 10:00:00 +0000\r\n"
    b"Message-ID: <dkim-test-1@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Hello Bob,\r\n\r\nthis message is signed by the gateway.\r\n"
)


@pytest.fixture(scope="module")
def keys() -> dict[str, tuple[str, str]]:
    return {algorithm: dkim.generate_key(algorithm) for algorithm in dkim.ALGORITHMS}


def publish(stub: DNSStub, keys: dict[str, tuple[str, str]]) -> None:
    stub.set_zones({
        "rsa2026._domainkey.example.com": [txt(keys["rsa-sha256"][1])],
        "ed2026._domainkey.example.com": [txt(keys["ed25519-sha256"][1])],
    })


SELECTORS = {"rsa-sha256": "rsa2026", "ed25519-sha256": "ed2026"}


def signed(algorithm: str, keys: dict[str, tuple[str, str]], message: bytes = MESSAGE) -> bytes:
    header = dkim.sign(message, "example.com", SELECTORS[algorithm], keys[algorithm][0], algorithm)
    return header + message


def test_generate_key_formats(keys: dict[str, tuple[str, str]]) -> None:
    rsa_pem, rsa_txt = keys["rsa-sha256"]
    assert rsa_pem.startswith("-----BEGIN RSA PRIVATE KEY-----") and rsa_txt.startswith("v=DKIM1; k=rsa; p=MII")
    pk = dkimpy.evaluate_pk(b"x", rsa_txt.encode())
    assert pk[1] == 2048 and pk[2] == b"rsa"
    ed_pem, ed_txt = keys["ed25519-sha256"]
    assert ed_pem.startswith("-----BEGIN PRIVATE KEY-----") and ed_txt.startswith("v=DKIM1; k=ed25519; p=")
    # RFC 8463 §4: p= is the bare 32-byte key, not a SubjectPublicKeyInfo.
    assert len(base64.b64decode(ed_txt.split("p=")[1])) == 32
    entry = dkim.zone_file_entry("rsa2026", "example.com", rsa_txt)
    assert entry.startswith('rsa2026._domainkey.example.com. IN TXT ( "v=DKIM1; k=rsa; p=')
    assert all(len(part) <= 257 for part in entry.split(" ") if part.startswith('"'))
    with pytest.raises(ValueError):
        dkim.generate_key("rsa-sha1")


@pytest.mark.parametrize("algorithm", dkim.ALGORITHMS)
def test_we_verify_what_we_sign(algorithm: str, keys, stub: DNSStub, resolver: SyncResolver) -> None:
    publish(stub, keys)
    header = dkim.sign(MESSAGE, "example.com", SELECTORS[algorithm], keys[algorithm][0], algorithm)
    assert header.startswith(b"DKIM-Signature: v=1; a=" + algorithm.encode()) and header.endswith(b"\r\n")
    assert b"c=relaxed/relaxed" in header and b"d=example.com" in header
    (result,) = dkim.verify(header + MESSAGE, resolver)
    assert result.result == "pass" and result.algorithm == algorithm
    # One changed byte of the body breaks it.
    tampered = header + MESSAGE.replace(b"signed by", b"signed bY")
    (result,) = dkim.verify(tampered, resolver)
    assert result.result == "fail" and result.reason == "body hash did not verify"


def test_sign_options(keys, stub: DNSStub, resolver: SyncResolver) -> None:
    publish(stub, keys)
    rsa_pem = keys["rsa-sha256"][0]
    header = dkim.sign(MESSAGE, "example.com", "rsa2026", rsa_pem, "rsa", headers=["From", "Subject"],
                       canonicalize=("simple", "simple"), identity="alice@example.com")
    unfolded = re.sub(rb"\r?\n[ \t]+", b" ", header)
    assert b"h=from : subject;" in unfolded and b"c=simple/simple" in unfolded and b"i=alice@example.com" in unfolded
    assert dkim.verify(header + MESSAGE, resolver)[0].passed
    # A PKCS#8 RSA key is accepted as well as PKCS#1; LF-only messages get an LF-terminated header.
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(rsa_pem.encode(), password=None)
    pkcs8 = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
    lf_message = MESSAGE.replace(b"\r\n", b"\n")
    header = dkim.sign(lf_message, "example.com", "rsa2026", pkcs8)
    assert header.endswith(b"\n") and not header.endswith(b"\r\n")
    assert dkim.verify(header + lf_message, resolver)[0].passed
    with pytest.raises(ValueError):
        dkim.sign(MESSAGE, "example.com", "ed2026", rsa_pem, "ed25519-sha256")
    with pytest.raises(dkimpy.ParameterError):
        dkim.sign(read(DKIMPY / "test_nofrom.message"), "example.com", "rsa2026", rsa_pem)


def test_corpus_unsigned_messages_sign_and_verify(stub: DNSStub, resolver: SyncResolver) -> None:
    # dkimpy's own keys and messages: test.private with test.txt, ed25519test.key with ed25519test.dns, and
    # RFC 8463's key (RFC 8032 test 1) for RFC 6376's example message.
    stub.set_zones({
        "test._domainkey.example.com": [txt(key_txt(DKIMPY / "test.txt"))],
        "ed._domainkey.example.com": [txt(f"v=DKIM1; {ed25519test_public_key()}")],
        "brisbane._domainkey.football.example.com": [txt(f"v=DKIM1; k=ed25519; p={rfc8463_public_key()}")],
    })
    rsa_key = read(DKIMPY / "test.private")
    for name in ("test.message", "rfc6376.w1258.msg", "test_extra.message"):
        message = read(DKIMPY / name)
        # dkimpy's 1024-bit test key: fine to verify (RFC 8301 floor), refused for signing only below 1024.
        header = dkim.sign(message, "example.com", "test", rsa_key)
        assert [r.result for r in dkim.verify(header + message, resolver)] == ["pass"], name
    message = read(DKIMPY / "ed25519test.msg")
    header = dkim.sign(message, "example.com", "ed", read(DKIMPY / "ed25519test.key"), "ed25519-sha256")
    assert dkim.verify(header + message, resolver)[0].passed
    message = read(DKIMPY / "rfc6376.msg")
    header = dkim.sign(message, "football.example.com", "brisbane", read(DKIMPY / "rfc8032_7_1.key"), "ed25519")
    assert dkim.verify(header + message, resolver)[0].passed


def test_verify_edge_cases(keys, stub: DNSStub, resolver: SyncResolver) -> None:
    publish(stub, keys)
    assert dkim.verify(b"", resolver) == []
    assert dkim.verify(b"From: a@example.com\r\n\r\nno signature\r\n", resolver) == []
    # An mbox "From " separator line in front does not hide the signature.
    assert dkim.verify(b"From alice@example.com Tue Dec  1 10:00:00 2026\n" + signed("rsa-sha256", keys),
                       resolver)[0].passed
    # Two signatures, one of them broken: each gets its own result.
    good = signed("ed25519-sha256", keys)
    broken = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=rsa2026; h=from; bh=AAAA; b=AAAA\r\n"
    results = dkim.verify(broken + good, resolver)
    assert [r.result for r in results] == ["fail", "pass"]
    syntax = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com\r\n" + MESSAGE
    assert [r.result for r in dkim.verify(syntax, resolver)] == ["neutral"]
    sha1 = b"DKIM-Signature: v=1; a=rsa-sha1; d=example.com; s=rsa2026; h=from; bh=AAAA; b=AAAA\r\n" + MESSAGE
    (result,) = dkim.verify(sha1, resolver)
    assert result.result == "neutral" and "RFC 8301" in result.reason


# --- the independent verifier: Perl's Mail::DKIM -------------------------------------------------------------------

MAIL_DKIM_VERIFY = r"""
use strict;
use warnings;
use Mail::DKIM::Verifier;
use Mail::DKIM::DNS;
use Net::DNS::Resolver;

# Only the test's DNS stub is asked: no resolv.conf servers, no search list.
my $resolver = Net::DNS::Resolver->new(
    nameservers => ['127.0.0.1'], port => $ARGV[0], recurse => 1, searchlist => [], defnames => 0,
    udp_timeout => 5, tcp_timeout => 5, retry => 1);
Mail::DKIM::DNS::resolver($resolver);
my $dkim = Mail::DKIM::Verifier->new();
binmode STDIN;
while (my $line = <STDIN>) {
    $line =~ s/\015?\012\z//;
    $dkim->PRINT("$line\015\012");
}
$dkim->CLOSE();
foreach my $signature ($dkim->signatures) {
    printf "%s %s %s %s\n", $signature->result, $signature->domain, $signature->selector,
        ($signature->result_detail // '');
}
"""


def ci_requires_tools() -> bool:
    value = os.environ.get("CI", "").strip().lower()
    return bool(value) and value not in ("0", "false")


def require(available: bool, what: str) -> None:
    if available:
        return
    if ci_requires_tools():
        pytest.fail(f"{what} is missing, and CI requires it")
    pytest.skip(f"{what} is missing")


def perl_has(module: str) -> bool:
    perl = shutil.which("perl")
    return bool(perl) and subprocess.run([perl, f"-M{module}", "-e", "1"], capture_output=True).returncode == 0


def mail_dkim_verify(message: bytes, stub: DNSStub, tmp_path: Path) -> list[str]:
    script = tmp_path / "verify.pl"
    script.write_text(MAIL_DKIM_VERIFY)
    done = subprocess.run(["perl", str(script), str(stub.port)], input=message, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode().splitlines()


def mail_dkim_has_ed25519() -> bool:
    # Debian 12's Mail::DKIM (1.20230212) knows rsa-sha1 and rsa-sha256 only; ed25519-sha256 came later upstream.
    probe = ("use Mail::DKIM::Signature; my $c = Mail::DKIM::Signature->new->get_algorithm_class('ed25519-sha256');"
             " exit($c ? 0 : 1);")
    return subprocess.run(["perl", "-e", probe], capture_output=True).returncode == 0


@pytest.mark.parametrize("algorithm", dkim.ALGORITHMS)
def test_mail_dkim_verifies_what_we_sign(algorithm: str, keys, stub: DNSStub, tmp_path: Path) -> None:
    require(perl_has("Mail::DKIM::Verifier"), "Perl Mail::DKIM (Debian libmail-dkim-perl)")
    if algorithm == "ed25519-sha256" and not mail_dkim_has_ed25519():
        # Installed, but this version cannot check ed25519: not a missing tool, so a skip even under CI. Our
        # ed25519 verification is cross-checked against Exim's and RFC 8463's signatures in test_vectors instead.
        pytest.skip("this Mail::DKIM has no ed25519-sha256 support")
    publish(stub, keys)
    message = signed(algorithm, keys)
    (line,) = mail_dkim_verify(message, stub, tmp_path)
    assert line.startswith(f"pass example.com {SELECTORS[algorithm]}"), line
    # The stub saw Mail::DKIM's key query: it verified against our published key, not some other.
    assert (f"{SELECTORS[algorithm]}._domainkey.example.com", "TXT") in stub.queries
    (line,) = mail_dkim_verify(message.replace(b"Hello Bob", b"Hello Bib"), stub, tmp_path)
    assert line.startswith("fail example.com") and "body has been altered" in line, line


@pytest.mark.parametrize(("path", "expected"), [pytest.param(p, e, id=p.name) for p, e in VECTORS if e])
def test_mail_dkim_agrees_on_the_vectors(path: Path, expected: list[str], stub: DNSStub, tmp_path: Path) -> None:
    # A second opinion on the vector table: where we say pass, Mail::DKIM says pass; where we don't, it doesn't.
    require(perl_has("Mail::DKIM::Verifier"), "Perl Mail::DKIM (Debian libmail-dkim-perl)")
    ours = dkim.verify(read(path), SyncResolver([stub.host], stub.port, 0.5))
    assert [r.result for r in ours] == expected
    lines = mail_dkim_verify(read(path), stub, tmp_path)
    assert len(lines) == len(expected)
    compared = 0
    for line, mine in zip(lines, ours, strict=True):
        if "unsupported algorithm" in line and mine.algorithm == "ed25519-sha256" and not mail_dkim_has_ed25519():
            continue  # this Mail::DKIM cannot judge ed25519 (see above)
        assert (line.split(" ", 1)[0] == "pass") == (mine.result == "pass"), line
        compared += 1
    if not compared:
        pytest.skip("only ed25519 signatures, which this Mail::DKIM cannot check")


def test_opendkim_signature_is_refused_as_rsa_sha1(stub: DNSStub, resolver: SyncResolver, tmp_path: Path) -> None:
    # OpenDKIM's test signer uses rsa-sha1, which RFC 8301 forbids verifiers to accept: we must not call it pass,
    # though the signature itself is sound (dkimpy's bare check, which still allows sha1, accepts it).
    tool = shutil.which("opendkim-testmsg") or ("/usr/sbin/opendkim-testmsg"
                                                 if Path("/usr/sbin/opendkim-testmsg").exists() else None)
    require(tool is not None, "opendkim-testmsg (Debian opendkim-tools)")
    private_pem, record = dkim.generate_key("rsa")
    keyfile = tmp_path / "key.pem"
    keyfile.write_text(private_pem)
    stub.set_zones({"odk._domainkey.example.com": [txt(record)]})
    done = subprocess.run([tool, "-C", "-d", "example.com", "-s", "odk", "-k", str(keyfile)], input=MESSAGE,
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    (result,) = dkim.verify(done.stdout, resolver)
    assert result.result == "neutral" and "rsa-sha1" in result.reason
    assert dkimpy.verify(done.stdout, dnsfunc=lambda name, timeout=5: resolver.lookup_txt_bytes(name.decode())[0])
