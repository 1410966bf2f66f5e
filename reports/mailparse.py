"""Reading a stored message for the detail page: headers, relay path, authentication results, a safe preview.

Everything here faces hostile input (the message is whatever a stranger sent us), so every step is defensive:
a header that does not decode is shown raw, a part that does not parse is skipped with a note, and nothing
raises to the view. The HTML preview is sanitised with nh3 (no scripts, no forms, no remote content) and is
then served from its own URL, in a sandboxed frame, under a CSP that forbids everything but inline styles and
data: images: two locks, so a gap in one is not a hole.
"""

from __future__ import annotations

import email
import email.errors
import email.policy
import logging
import re
from dataclasses import dataclass, field
from email.message import Message
from itertools import islice

import nh3

log = logging.getLogger(__name__)

MAX_PREVIEW_CHARS = 500_000
MAX_PARTS = 500
# What the page reads of a stored message, whatever its size. Parsing costs per part, per line and per encoded
# word (a 7 MB message of 200,000 parts took 25 s whole), so each is bounded before parsing starts: the first
# MAX_PARSE_BYTES, cut before the MAX_PARTS-th MIME boundary, a header section of MAX_HEADER_BYTES; then
# MAX_HEADERS header fields shown, MAX_HEADER_CHARS of each, MAX_DECODED_CHARS of them decoded, MAX_RESULTS
# relay hops and authentication results. Within these any message is read in a fraction of a second; the
# download of the original stays whole.
MAX_PARSE_BYTES = 1024 * 1024
MAX_HEADER_BYTES = 256 * 1024
MAX_HEADERS = 500
MAX_HEADER_CHARS = 8000
MAX_DECODED_CHARS = 100_000
MAX_RESULTS = 200
LONG_VALUE_MARK = " [...]"


@dataclass
class Hop:
    from_name: str = ""
    reverse_name: str = ""
    ip: str = ""
    by: str = ""
    protocol: str = ""
    date: str = ""
    raw: str = ""


@dataclass
class ParsedMessage:
    headers: list[tuple[str, str]] = field(default_factory=list)
    hops: list[Hop] = field(default_factory=list)
    auth_results: list[dict] = field(default_factory=list)
    text: str | None = None
    html: str | None = None
    parts: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    # True when only a first piece of the message was read (too large, or too many parts, to show whole).
    truncated: bool = False

    def header(self, name: str) -> str:
        name = name.lower()
        return next((value for key, value in self.headers if key.lower() == name), "")


LONG_VALUE_MARK = " [...]"


def _decode_header(name: str, value: str) -> str:
    try:
        return str(email.policy.default.header_factory(name, value))
    except Exception:  # noqa: BLE001 - a header that does not decode is shown as it came
        return value


def _shown_headers(msg: Message, parsed: ParsedMessage) -> None:
    """The first MAX_HEADERS header fields, decoded (RFC 2047) while the budget of MAX_DECODED_CHARS lasts,
    then as they came; a value longer than MAX_HEADER_CHARS is cut."""
    budget, long_values = MAX_DECODED_CHARS, False
    for name, raw in islice(msg.raw_items(), MAX_HEADERS):
        value = str(raw)
        if len(value) > MAX_HEADER_CHARS:
            value, long_values = value[:MAX_HEADER_CHARS] + LONG_VALUE_MARK, True
        elif budget > 0:
            budget -= len(value)
            value = _decode_header(name, value)
        parsed.headers.append((name, value))
    if long_values:
        parsed.problems.append(f"Some header fields are longer than {MAX_HEADER_CHARS:,} characters: only their "
                               "beginning is shown.")
    if budget <= 0:
        parsed.problems.append("The header fields are too many or too long to decode all: the last ones are "
                               "shown as they came.")
    if len(msg) > MAX_HEADERS:
        parsed.truncated = True
        parsed.problems.append(f"This message has {len(msg):,} header fields: only the first {MAX_HEADERS} are "
                               "shown.")


def _line_end_before(piece: bytes, limit: int) -> int:
    """Where to cut `piece` to at most `limit` bytes: after the last line break before it, unless that would
    throw much away (a body without line breaks)."""
    end = piece.rfind(b"\n", max(0, limit - 64 * 1024), limit)
    return end + 1 if end >= 0 else limit


def _cut(data: bytes, size: int) -> tuple[bytes, list[str]]:
    """The piece of a message the page reads, and what it says about the rest.

    At most MAX_PARSE_BYTES, ended at a line's end; a header section of at most MAX_HEADER_BYTES (then nothing
    after it); and ended before the MAX_PARTS-th line that starts with '--' (a MIME boundary, or a line that
    only looks like one: cutting there too early costs a little of the preview, never the time) when it is
    multipart. Each is one pass in C over the bytes, before any parsing."""
    notes = []
    piece = data[:MAX_PARSE_BYTES]
    if size > len(piece):
        piece = piece[:_line_end_before(piece, len(piece))]
        notes.append(f"This message is {_megabytes(size)}: only its first {_megabytes(len(piece))} are read for "
                     "this page.")
    blank = min((i for i in (piece.find(b"\n\n"), piece.find(b"\n\r\n")) if i >= 0), default=-1)
    if (blank < 0 or blank > MAX_HEADER_BYTES) and len(piece) > MAX_HEADER_BYTES:
        piece = piece[:_line_end_before(piece, MAX_HEADER_BYTES)]
        notes.append(f"The header section is larger than {_megabytes(MAX_HEADER_BYTES)}: only its beginning is "
                     "read, and none of the body.")
    cut = _before_boundary(piece, MAX_PARTS)
    if cut is not None:
        piece = piece[:cut]
        notes.append(f"This message has more than {MAX_PARTS - 1} MIME parts: only the first {MAX_PARTS - 1} are "
                     "read.")
    return piece, notes


_MULTIPART = re.compile(rb"content-type:[ \t]*multipart/", re.IGNORECASE)


def _before_boundary(piece: bytes, count: int) -> int | None:
    """Where the `count`-th line starting with '--' of a multipart message begins; None when it has fewer (or
    is not multipart: a text full of '--' lines is cut by size only)."""
    if not _MULTIPART.search(piece):
        return None
    position = -1
    for _ in range(count):
        position = piece.find(b"\n--", position + 1)
        if position < 0:
            return None
    return position + 1


def _megabytes(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MB" if size >= 1000 * 1024 else f"{size / 1024:.0f} KB"


def parse(data: bytes | memoryview | None, *, size: int | None = None) -> ParsedMessage:
    """Read a stored message for the page. `data` may be the message's first bytes only (the view reads no more
    than MAX_PARSE_BYTES of it); `size` is then the whole message's size."""
    parsed = ParsedMessage()
    if not data:
        parsed.problems.append("The original message is not stored.")
        return parsed
    data = bytes(data)
    piece, notes = _cut(data, max(size or 0, len(data)))
    if notes:
        parsed.truncated = True
        parsed.problems.extend(notes)
    try:
        # The structure with the compat32 policy: it keeps header values as the strings they came as, where
        # the default policy builds an object for every header it is asked about (a tenth of a millisecond each,
        # several per part); the headers shown are decoded one by one, with the default policy.
        msg = email.message_from_bytes(piece, policy=email.policy.compat32)
    except Exception as exc:  # noqa: BLE001
        log.info("message does not parse: %s", exc)
        parsed.problems.append(f"The message does not parse as MIME ({type(exc).__name__}).")
        return parsed
    try:
        _shown_headers(msg, parsed)
    except Exception as exc:  # noqa: BLE001
        parsed.problems.append(f"Some headers could not be read ({type(exc).__name__}).")
    received = [value for name, value in parsed.headers if name.lower() == "received"]
    # Received headers are prepended by each relay: the last one is the first hop.
    parsed.hops = [parse_received(value) for value in reversed(received[:MAX_RESULTS])]
    for name, value in parsed.headers:
        if name.lower() == "authentication-results" and len(parsed.auth_results) < MAX_RESULTS:
            parsed.auth_results.extend(parse_authentication_results(value)[:MAX_RESULTS - len(parsed.auth_results)])
    for problem in msg.defects[:10] if hasattr(msg, "defects") else []:
        if parsed.truncated and isinstance(problem, email.errors.CloseBoundaryNotFoundDefect):
            continue  # the end was cut off here, not missing from the message
        parsed.problems.append(f"MIME defect: {type(problem).__name__}")
    try:
        _walk_parts(msg, parsed)
    except RecursionError:
        parsed.problems.append("The MIME structure is nested too deeply to show.")
    except Exception as exc:  # noqa: BLE001
        parsed.problems.append(f"Some parts could not be read ({type(exc).__name__}).")
    return parsed


def _walk_parts(msg: Message, parsed: ParsedMessage) -> None:
    for index, part in enumerate(msg.walk()):
        if index >= MAX_PARTS:
            parsed.problems.append(f"Only the first {MAX_PARTS} MIME parts are shown.")
            return
        if part.is_multipart():
            continue
        content_type = part.get_content_type()
        try:
            filename = part.get_filename() or ""
        except Exception:  # noqa: BLE001
            filename = ""
        try:
            disposition = part.get_content_disposition() or ""
        except Exception:  # noqa: BLE001
            disposition = ""
        payload = _payload_bytes(part)
        parsed.parts.append({"content_type": content_type, "filename": filename, "size": len(payload),
                             "disposition": disposition})
        if disposition == "attachment" or filename:
            continue
        if content_type == "text/plain" and parsed.text is None:
            parsed.text = _text_of(part, payload)[:MAX_PREVIEW_CHARS]
        elif content_type == "text/html" and parsed.html is None:
            parsed.html = _text_of(part, payload)[:MAX_PREVIEW_CHARS]


def _payload_bytes(part) -> bytes:
    try:
        payload = part.get_payload(decode=True)
    except Exception:  # noqa: BLE001
        payload = None
    return payload if isinstance(payload, bytes) else b""


def _text_of(part, payload: bytes) -> str:
    charset = "utf-8"
    try:
        charset = part.get_content_charset() or "utf-8"
        return payload.decode(charset, errors="replace")
    except (LookupError, UnicodeError, ValueError):
        return payload.decode("utf-8", errors="replace")


_RECEIVED_FROM = re.compile(r"^\s*from\s+(?P<name>\S+)(?:\s+\((?P<info>[^)]*)\))?", re.IGNORECASE)
_RECEIVED_BY = re.compile(r"\bby\s+(?P<by>[^\s;]+)", re.IGNORECASE)
_RECEIVED_WITH = re.compile(r"\bwith\s+(?P<with>[^\s;]+)", re.IGNORECASE)
_IP_IN_BRACKETS = re.compile(r"\[(?:IPv6:)?(?P<ip>[0-9A-Fa-f:.]+)\]")
_NAME_BEFORE_IP = re.compile(r"^\s*(?P<rdns>[A-Za-z0-9._-]+\.[A-Za-z]{2,})\s*\[")


def parse_received(value: str) -> Hop:
    """A Received header as a hop: the sending host's HELO name, reverse name and IP, the receiver."""
    flat = " ".join(value.split())
    hop = Hop(raw=flat)
    head, _, date = flat.rpartition(";")
    if head:
        hop.date = date.strip()
    else:
        head = flat
    match = _RECEIVED_FROM.search(head)
    if match:
        hop.from_name = match.group("name")
        info = match.group("info") or ""
        ip = _IP_IN_BRACKETS.search(info) or _IP_IN_BRACKETS.search(hop.from_name)
        if ip:
            hop.ip = ip.group("ip")
        rdns = _NAME_BEFORE_IP.search(info)
        if rdns:
            hop.reverse_name = rdns.group("rdns")
        elif info and not ip:
            hop.reverse_name = info.split()[0] if info.split() else ""
    for regex, attr, group in ((_RECEIVED_BY, "by", "by"), (_RECEIVED_WITH, "protocol", "with")):
        found = regex.search(head)
        if found:
            setattr(hop, attr, found.group(group))
    return hop


_METHOD_RESULT = re.compile(r"^\s*(?P<method>[A-Za-z0-9_.-]+)\s*=\s*(?P<result>[A-Za-z0-9_-]+)(?P<rest>.*)$", re.DOTALL)


def parse_authentication_results(value: str) -> list[dict]:
    """`authserv-id; spf=pass smtp.mailfrom=…; dkim=fail …` as [{method, result, detail, server}]."""
    flat = " ".join(value.split())
    flat = re.sub(r"\([^()]*\)", "", flat)  # comments, which may contain ';'
    chunks = [chunk.strip() for chunk in flat.split(";")]
    if not chunks:
        return []
    server = chunks[0].split()[0] if chunks[0].split() else ""
    results = []
    for chunk in chunks[1:]:
        match = _METHOD_RESULT.match(chunk)
        if match and match.group("method").lower() != "none":
            results.append({"method": match.group("method").lower(), "result": match.group("result").lower(),
                            "detail": match.group("rest").strip(), "server": server})
    return results


def checks_summary(checks: dict | None) -> list[dict]:
    """Message.checks (the gateway's own SPF/DKIM/DMARC/… results) as rows for the page.

    Its shape belongs to the gateway, so this reads it loosely: a string result, or a dict with a
    'result' and the rest as details.
    """
    rows = []
    if not isinstance(checks, dict):
        return rows
    for name, value in checks.items():
        if isinstance(value, dict):
            result = value.get("result", value.get("status", ""))
            detail = ", ".join(f"{k}={v}" for k, v in value.items() if k not in ("result", "status"))
        elif isinstance(value, list):
            result, detail = "", ", ".join(str(v) for v in value)
        else:
            result, detail = value, ""
        rows.append({"name": str(name), "result": str(result), "detail": detail[:1000]})
    return rows


# --- The sanitised preview -------------------------------------------------------------------------------

_SAFE_IMAGE = re.compile(r"^data:image/(png|gif|jpe?g|webp);base64,", re.IGNORECASE)
_SAFE_LINK = re.compile(r"^(https?:|mailto:)", re.IGNORECASE)
_STYLE_PROPERTIES = {
    "color", "background-color", "font-weight", "font-style", "font-size", "font-family", "text-align",
    "text-decoration", "line-height", "margin", "margin-left", "margin-right", "margin-top", "margin-bottom",
    "padding", "padding-left", "padding-right", "padding-top", "padding-bottom", "border", "border-collapse",
    "width", "max-width", "vertical-align", "white-space",
}
_ATTRIBUTES = {tag: set(attrs) for tag, attrs in nh3.ALLOWED_ATTRIBUTES.items()}
_ATTRIBUTES["*"] = {"style", "title", "dir", "lang"}
_ATTRIBUTES.setdefault("td", set()).update({"width", "valign", "bgcolor"})
_ATTRIBUTES.setdefault("table", set()).update({"width", "cellpadding", "cellspacing", "border"})
_ATTRIBUTES.setdefault("font", set()).update({"color", "size"})


def _filter_attribute(tag: str, attribute: str, value: str) -> str | None:
    # No remote content: an <img> keeps only an inline data: image; a link only http(s) and mailto.
    if tag == "img" and attribute == "src":
        return value if _SAFE_IMAGE.match(value.strip()) else None
    if tag == "a" and attribute == "href":
        return value if _SAFE_LINK.match(value.strip()) else None
    return value


def sanitize_html(html: str) -> str:
    """HTML mail reduced to harmless markup: no scripts, handlers, forms, frames, remote images or CSS urls."""
    return nh3.clean(
        html,
        tags=set(nh3.ALLOWED_TAGS) | {"font"},
        clean_content_tags={"script", "style", "title", "head", "noscript", "template", "svg", "math"},
        attributes=_ATTRIBUTES,
        attribute_filter=_filter_attribute,
        filter_style_properties=_STYLE_PROPERTIES,
        url_schemes={"http", "https", "mailto", "data"},
        link_rel="noopener noreferrer nofollow",
    )
