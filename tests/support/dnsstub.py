"""A small authoritative DNS server for tests: serves zones given as Python dicts on 127.0.0.1, UDP and TCP.

Zone data uses the format of the OpenSPF test suite's ``zonedata`` (rfc7208-tests.yml)::

    {
        "example.com": [
            {"TXT": "v=spf1 mx -all"},            # one character-string
            {"TXT": ["v=spf1 ip4:", "192.0.2.1 -all"]},   # several character-strings in one record
            {"SPF": "v=spf1 -all"},               # type 99, same rdata as TXT
            {"A": "192.0.2.1"}, {"AAAA": "2001:db8::1"},
            {"MX": [10, "mx.example.com"]},
            {"PTR": "host.example.com"}, {"CNAME": "other.example.com"},
            {"TXT": "NONE"},                       # "has TXT" for the SPF->TXT copy rule, but serves nothing
            {"A": "TIMEOUT"},                      # A queries at this name get no answer
            "TIMEOUT",                             # queries for types not listed before this get no answer
        ],
    }

Semantics, as the suite's reference driver (pyspf's testspf.py) has them:

- Names are case-insensitive. A name that is neither listed nor an ancestor of a listed name is NXDOMAIN; a listed
  name (or an empty non-terminal, RFC 8020) without records of the asked type is NOERROR with no answer (NODATA).
- ``"TIMEOUT"`` in a name's list: a query for a type with no record before that marker is never answered (the
  client times out). Records of the asked type listed before the marker are served normally.
- ``copy_spf_to_txt=True`` (for the RFC 7208 suite): a name with SPF records and no TXT entry at all also serves
  them as TXT, the "auto-magic duplication" the suite's header asks drivers to do.
- CNAMEs are chased within the data (as a recursive server would for a stub resolver), up to 8 links; the answer
  holds the chain, and its rcode is that of the last name. A CNAME loop is answered SERVFAIL, as recursive
  servers do (RFC 1034 §3.6.2 asks for an error).
- ``{"SPF": []}`` (a record with no character-string) is served as one empty character-string: zero strings is
  not valid TXT rdata and dnspython refuses such an answer as malformed.
- Answers larger than the client's UDP payload size (512, or its EDNS0 size) are truncated (TC), so clients retry
  over TCP as they would with a real server.

Use::

    with DNSStub({"example.com": [{"A": "192.0.2.1"}]}) as stub:
        resolver = Resolver(nameservers=[stub.host], port=stub.port, timeout=1)
        ...
        stub.set_zones({...})        # replace everything between tests

``stub.queries`` records every question asked, as ``(name, type)`` pairs, for assertions.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

ZoneData = Mapping[str, Iterable[Any]]

TTL = 300
MAX_CNAME_CHAIN = 8
TIMEOUT = "TIMEOUT"
NONE = "NONE"


def _key(name: str | dns.name.Name) -> dns.name.Name:
    """Lowercased absolute name: the lookup key (dnspython names hash case-insensitively, but be explicit)."""
    if isinstance(name, str):
        name = dns.name.from_text(name.rstrip(".") + ".")
    return name.canonicalize()


def _rdata(rdtype: str, value: Any) -> dns.rdata.Rdata:
    """Build rdata from the suite's human-readable value."""
    cls, typ = dns.rdataclass.IN, dns.rdatatype.from_text(rdtype)
    if rdtype in ("TXT", "SPF"):
        strings = [value] if isinstance(value, str) else list(value)
        if not strings:
            strings = [""]
        # Suite records carry non-ASCII characters (to test rejection): keep their UTF-8 bytes on the wire.
        raw = [s.encode("utf-8") if isinstance(s, str) else bytes(s) for s in strings]
        wire = b"".join(bytes([len(s)]) + s for s in raw)
        return dns.rdata.from_wire(cls, typ, wire, 0, len(wire))
    if rdtype == "MX":
        preference, exchange = value
        return dns.rdata.from_text(cls, typ, f"{int(preference)} {_key(str(exchange)).to_text()}")
    if rdtype in ("PTR", "CNAME", "NS"):
        return dns.rdata.from_text(cls, typ, _key(str(value)).to_text())
    return dns.rdata.from_text(cls, typ, str(value))


class _Name:
    """What one owner name serves: records by type, and which types time out."""

    def __init__(self) -> None:
        self.records: dict[int, list[dns.rdata.Rdata]] = {}
        self.timeout_types: set[int] = set()
        self.timeout_rest = False  # a bare "TIMEOUT" marker: types not seen before it time out
        self.before_timeout: set[int] = set()

    def times_out(self, rdtype: int) -> bool:
        if rdtype in self.timeout_types:
            return True
        return self.timeout_rest and rdtype not in self.before_timeout and dns.rdatatype.CNAME not in self.records


def _load(zones: ZoneData, copy_spf_to_txt: bool) -> dict[dns.name.Name, _Name]:
    loaded: dict[dns.name.Name, _Name] = {}
    for owner, entries in zones.items():
        node = loaded.setdefault(_key(owner), _Name())
        entries = list(entries)
        has_txt = any(isinstance(e, Mapping) and "TXT" in e for e in entries)
        spf_copies: list[Any] = []
        for entry in entries:
            if entry == TIMEOUT:
                node.timeout_rest = True
                continue
            for rdtype, value in entry.items():
                rdtype = rdtype.upper()
                typ = dns.rdatatype.from_text(rdtype)
                # A "NONE" placeholder serves nothing, so it does not shield its type from a later TIMEOUT
                # (the reference driver drops it before looking for the marker).
                if not node.timeout_rest and value != NONE:
                    node.before_timeout.add(typ)
                if value == TIMEOUT:
                    node.timeout_types.add(typ)
                    continue
                if rdtype == "SPF" and copy_spf_to_txt and not has_txt and value != NONE:
                    spf_copies.append(value)
                if value == NONE:
                    continue
                node.records.setdefault(typ, []).append(_rdata(rdtype, value))
        if spf_copies:
            # The reference driver appends the copies after every other entry, so behind a TIMEOUT marker
            # (if any): TXT queries at such a name then time out.
            node.records.setdefault(dns.rdatatype.TXT, []).extend(_rdata("TXT", v) for v in spf_copies)
    return loaded


class DNSStub:
    """Authoritative DNS server on 127.0.0.1 (UDP and TCP on one free port) run in a background thread."""

    def __init__(self, zones: ZoneData | None = None, *, copy_spf_to_txt: bool = False, host: str = "127.0.0.1"):
        self.host = host
        self.port = 0
        self.queries: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._names: dict[dns.name.Name, _Name] = {}
        self._ancestors: set[dns.name.Name] = set()
        self.set_zones(zones or {}, copy_spf_to_txt=copy_spf_to_txt)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None

    # --- zone data -------------------------------------------------------------------------------------------

    def set_zones(self, zones: ZoneData, *, copy_spf_to_txt: bool = False) -> None:
        """Replace all zone data (and forget the recorded queries)."""
        names = _load(zones, copy_spf_to_txt)
        ancestors: set[dns.name.Name] = set()
        for name in names:
            parent = name
            while parent != dns.name.root:
                parent = parent.parent()
                ancestors.add(parent)
        with self._lock:
            self._names, self._ancestors = names, ancestors
            self.queries = []

    def add(self, name: str, *entries: Any) -> None:
        """Add entries (same format as the zone lists) to one name, keeping the rest."""
        extra = _load({name: entries}, False)[_key(name)]
        with self._lock:
            node = self._names.setdefault(_key(name), _Name())
            for typ, rdatas in extra.records.items():
                node.records.setdefault(typ, []).extend(rdatas)
            node.timeout_types |= extra.timeout_types
            node.timeout_rest |= extra.timeout_rest
            parent = _key(name)
            while parent != dns.name.root:
                parent = parent.parent()
                self._ancestors.add(parent)

    # --- answering -------------------------------------------------------------------------------------------

    def resolve(self, query: dns.message.Message) -> dns.message.Message | None:
        """The response to ``query``, or None to stay silent (a TIMEOUT)."""
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
            response.set_rcode(dns.rcode.NOTIMP if query.opcode() != dns.opcode.QUERY else dns.rcode.FORMERR)
            return response
        question = query.question[0]
        rdtype = question.rdtype
        with self._lock:
            self.queries.append((question.name.to_text(omit_final_dot=True), dns.rdatatype.to_text(rdtype)))
            name = question.name
            seen: set[dns.name.Name] = set()
            for _ in range(MAX_CNAME_CHAIN + 1):
                key = _key(name)
                node = self._names.get(key)
                if node is None:
                    if key not in self._ancestors:
                        response.set_rcode(dns.rcode.NXDOMAIN)
                    return response
                if node.times_out(rdtype):
                    return None
                cname = node.records.get(dns.rdatatype.CNAME)
                if cname and rdtype != dns.rdatatype.CNAME:
                    rrset = dns.rrset.from_rdata_list(name, TTL, cname[:1])
                    response.answer.append(rrset)
                    seen.add(key)
                    name = cname[0].target
                    if _key(name) in seen:
                        # A loop (RFC 1034 §3.6.2: signal an error): SERVFAIL, as recursive servers answer.
                        response.answer.clear()
                        response.set_rcode(dns.rcode.SERVFAIL)
                        return response
                    continue
                rdatas = node.records.get(rdtype)
                if rdatas:
                    response.answer.append(dns.rrset.from_rdata_list(name, TTL, rdatas))
                return response
            return response

    def _answer(self, wire: bytes, *, udp: bool) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None  # unparsable: no answer, like a server that drops garbage
        response = self.resolve(query)
        if response is None:
            return None
        if not udp:
            return response.to_wire(max_size=65535)
        limit = max(512, query.payload) if query.edns >= 0 else 512
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            # Header and question only, with TC set: the client retries over TCP.
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.AA | dns.flags.TC
            truncated.set_rcode(response.rcode())
            return truncated.to_wire()

    # --- server ----------------------------------------------------------------------------------------------

    def start(self) -> DNSStub:
        if self._thread is not None:
            return self
        for _ in range(20):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((self.host, 0))
            port = udp.getsockname()[1]
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind((self.host, port))
            except OSError:
                # The TCP side of this port is taken: try another pair.
                udp.close()
                tcp.close()
                continue
            break
        else:
            raise RuntimeError("DNSStub: no free port for UDP and TCP together")
        tcp.listen(16)
        self._udp, self._tcp, self.port = udp, tcp, port
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, name=f"dnsstub:{port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=5)
        self._thread = None
        for sock in (self._udp, self._tcp):
            if sock is not None:
                sock.close()
        self._udp = self._tcp = None

    def __enter__(self) -> DNSStub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def _serve(self) -> None:
        assert self._udp is not None and self._tcp is not None
        selector = selectors.DefaultSelector()
        selector.register(self._udp, selectors.EVENT_READ, "udp")
        selector.register(self._tcp, selectors.EVENT_READ, "tcp")
        try:
            while not self._stop.is_set():
                for key, _ in selector.select(timeout=0.1):
                    if key.data == "udp":
                        try:
                            wire, peer = self._udp.recvfrom(65535)
                        except OSError:
                            continue
                        reply = self._answer(wire, udp=True)
                        if reply is not None:
                            self._udp.sendto(reply, peer)
                    else:
                        try:
                            conn, _ = self._tcp.accept()
                        except OSError:
                            continue
                        threading.Thread(target=self._serve_tcp, args=(conn,), daemon=True).start()
        finally:
            selector.close()

    def _serve_tcp(self, conn: socket.socket) -> None:
        # RFC 7766: a connection may carry several length-prefixed queries; serve them until the client closes.
        conn.settimeout(10)
        with conn:
            try:
                while not self._stop.is_set():
                    header = _recv_exactly(conn, 2)
                    if header is None:
                        return
                    wire = _recv_exactly(conn, struct.unpack("!H", header)[0])
                    if wire is None:
                        return
                    reply = self._answer(wire, udp=False)
                    if reply is not None:
                        conn.sendall(struct.pack("!H", len(reply)) + reply)
            except OSError:
                return


def _recv_exactly(conn: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


@pytest.fixture(scope="module")
def dns_stub() -> Iterator[DNSStub]:
    """A running stub with no zones, shared by a test module; tests load theirs with ``set_zones``.

    tests/conftest.py provides it to every test module.
    """
    with DNSStub() as stub:
        yield stub
