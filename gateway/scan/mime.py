"""The MIME structure of a message as the gateway reads it itself (RFC 2045, 2046, 2047, 2231): the leaves a
mail client shows or saves, decoded, for the attachment rules and for clamd, which is given each of them as
well as the whole message (its own MIME parser is one reading among several, as in MailScanner and amavis).

Mail programs read a malformed structure differently: the first or the last of two Content-Type fields, a
parameter with or without its comment, a delimiter line with text after the boundary, a base64 body up to its
first padding or past it. Where readings differ, every reading is followed: the parts each one finds are all
read, each body is decoded every way a reader would, and every file name a reader could show is kept. Where
the readings cannot be enumerated (the header section itself read two ways, RFC 2231 continuations that
conflict, a boundary the body never uses while other delimiter-like lines are there) or a limit is reached,
the message is unscannable, and `Structure.unscannable` says why. docs/security-scanning.md lists each case.

The walk is iterative (a message nested 1,200 deep reaches the depth limit instead of the interpreter's
recursion limit) and works on offsets into the message's bytes: only decoded content is copied.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass, field

IDENTITY = ("7bit", "8bit", "binary")
UUENCODE = ("x-uuencode", "uuencode", "x-uue", "uue")
KNOWN_ENCODINGS = (*IDENTITY, "base64", "quoted-printable", *UUENCODE)
CONTENT_FIELDS = (b"content-type", b"content-transfer-encoding", b"content-disposition")


@dataclass(frozen=True)
class MimeLimits:
    max_parts: int = 1000  # every part counts, multipart containers and message/rfc822 wrappers included
    max_depth: int = 50  # multipart and message/rfc822 nesting below the message itself


@dataclass
class Leaf:
    """A part that is not a container: what a reader shows inline or offers to save."""

    number: str  # as IMAP numbers parts (RFC 3501 §6.4.5): "1", "2.1"; "" for a message that is one part
    types: list[str]  # every declared type, lower case, the first one first; ["text/plain"] when none
    names: list[str]  # every file name a reader could show, decoded (RFC 2047, RFC 2231), first one first
    bodies: list[bytes]  # the content, decoded each way the readers decode it (usually one)
    decoded: bool  # whether a body was decoded (base64, quoted-printable, uuencode), not taken as it is

    @property
    def label(self) -> str:
        return f"part {self.number}" if self.number else "the message body"


@dataclass
class Structure:
    leaves: list[Leaf] = field(default_factory=list)
    unscannable: list[str] = field(default_factory=list)  # why the message cannot be read one way only
    notes: list[str] = field(default_factory=list)  # readings that differed and were all followed
    parts: int = 0


@dataclass
class _Entity:
    buf: bytes
    start: int
    end: int
    depth: int
    number: str
    default_type: str = "text/plain"
    top: bool = False


@dataclass
class _Header:
    fields: list[tuple[bytes, str, bool]]  # (lower-case name, unfolded value, after a line that is no field)
    body_start: int
    # Where a reader that ends the header section at the first line that is no field (Python's email, for
    # one) starts the body instead; None when every line is a field.
    early_body_start: int | None
    bare_cr: bool = False  # a CR not followed by LF: a line break to some readers, not to others


def _label(number: str) -> str:
    return f"part {number}" if number else "the message"


# --- The header section ---------------------------------------------------------------------------------------

_FIELD_NAME = re.compile(rb"([\x21-\x39\x3b-\x7e]+)([ \t]*):")


def _read_header(buf: bytes, start: int, end: int, top: bool) -> _Header:
    """The fields up to the blank line (CRLF or bare LF), unfolded (RFC 5322 §2.2.3).

    A line that is no field (no colon; or the obsolete `Name :` of RFC 5322 §4.5.8, which some parsers do not
    take) is where some readers end the header section, while others skip it: both places are noted.
    """
    fields: list[tuple[bytes, str, bool]] = []
    values: list[list[bytes]] = []
    early: int | None = None
    bare_cr = False
    pos = start
    if top and buf.startswith(b"From ", start):  # an mbox separator line in front of the message
        newline = buf.find(b"\n", start, end)
        pos = end if newline < 0 else newline + 1
    while pos < end:
        newline = buf.find(b"\n", pos, end)
        next_pos = end if newline < 0 else newline + 1
        line = buf[pos:end if newline < 0 else newline]
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            return _Header(_unfolded(fields, values), next_pos, early, bare_cr)
        bare_cr = bare_cr or b"\r" in line
        if line[0] in b" \t":
            if values:
                values[-1].append(line)
            # else: a continuation with no field to continue, skipped (as Python's email does)
        else:
            match = _FIELD_NAME.match(line)
            if match is None or match.group(2):
                if early is None:
                    early = pos
            if match is not None:
                fields.append((match.group(1).lower(), "", early is not None))
                values.append([line[match.end():]])
        pos = next_pos
    return _Header(_unfolded(fields, values), end, early, bare_cr)


def _unfolded(fields: list[tuple[bytes, str, bool]], values: list[list[bytes]]) -> list[tuple[bytes, str, bool]]:
    # Latin-1 keeps every byte as it is (a boundary is matched as bytes); names are decoded later.
    return [(name, b"".join(lines).decode("latin-1").strip(), late)
            for (name, _, late), lines in zip(fields, values, strict=True)]


# --- Structured field values (RFC 2045 §5.1, with RFC 822 comments) -------------------------------------------

_TYPE = re.compile(r"^[!#$%&'*+.^_`|~0-9a-z-]+/[!#$%&'*+.^_`|~0-9a-z-]+$")


def _segments(value: str, comments: bool) -> list[str]:
    """The value split at the semicolons outside quoted strings (and, when comments are recognised, outside
    comments, which are then dropped)."""
    segments, current = [], []
    quoted, depth, escaped = False, 0, False
    for char in value:
        if escaped:
            escaped = False
            if depth == 0:
                current.append(char)
            continue
        if char == "\\" and (quoted or depth):
            escaped = True
            if depth == 0:
                current.append(char)
            continue
        if depth:
            depth += {"(": 1, ")": -1}.get(char, 0)
            continue
        if quoted:
            quoted = char != '"'
            current.append(char)
        elif char == '"':
            quoted = True
            current.append(char)
        elif char == "(" and comments:
            depth = 1
            current.append(" ")
        elif char == ";":
            segments.append("".join(current))
            current = []
        else:
            current.append(char)
    segments.append("".join(current))
    return segments


def _unquote(value: str) -> str:
    value = value.strip()
    if not value.startswith('"'):
        return value
    out, escaped = [], False
    for char in value[1:]:
        if escaped:
            out.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            break
        else:
            out.append(char)
    return "".join(out)


@dataclass
class _Params:
    values: dict[str, list[str]] = field(default_factory=dict)  # every candidate value of each parameter
    conflicts: list[str] = field(default_factory=list)  # RFC 2231 continuations that cannot be put together

    def add(self, name: str, value: str) -> None:
        found = self.values.setdefault(name, [])
        if value not in found:
            found.append(value)

    def get(self, name: str) -> list[str]:
        return self.values.get(name, [])


def _parameters(segments: list[str], params: _Params) -> None:
    """name=value pairs; RFC 2231 extended values (name*, name*0, name*1*, ...) put together."""
    extended: dict[str, dict[int, list[tuple[str, bool]]]] = {}
    for segment in segments:
        name, equals, value = segment.partition("=")
        name = name.strip().lower()
        if not equals or not name:
            continue
        if "*" not in name:
            params.add(name, _unquote(value))
            continue
        base, _, rest = name.partition("*")
        encoded = rest.endswith("*") or rest == ""
        number = rest.rstrip("*")
        index = int(number) if number.isascii() and number.isdigit() else 0 if number == "" else -1
        if index < 0:
            continue
        extended.setdefault(base, {}).setdefault(index, []).append((value.strip() if encoded else _unquote(value),
                                                                    encoded))
    for base, pieces in extended.items():
        if any(len({piece for piece in found}) > 1 for found in pieces.values()):
            params.conflicts.append(base)
            continue
        ordered = [pieces[i][0] for i in sorted(pieces)]
        params.add(base, _rfc2231_value(ordered))
        if sorted(pieces) != list(range(len(pieces))):
            # A gap in the numbering: some readers stop at it, others join what is there.
            contiguous = []
            for i in range(len(pieces)):
                if i not in pieces:
                    break
                contiguous.append(pieces[i][0])
            if contiguous:
                params.add(base, _rfc2231_value(contiguous))


_PERCENT = re.compile(rb"%([0-9A-Fa-f]{2})")


def _rfc2231_value(pieces: list[tuple[str, bool]]) -> str:
    """charset'language'percent-encoded (RFC 2231 §4): the charset is named by the first piece."""
    charset = "utf-8"
    raw = bytearray()
    for i, (text, encoded) in enumerate(pieces):
        data = text.encode("latin-1", "replace")
        if encoded:
            if i == 0 and data.count(b"'") >= 2:
                named, _language, data = data.split(b"'", 2)
                charset = named.decode("ascii", "replace") or charset
            data = _PERCENT.sub(lambda m: bytes([int(m.group(1), 16)]), data)
        raw += data
    return _text(bytes(raw), charset)


def _text(data: bytes, charset: str = "utf-8") -> str:
    for candidate in (charset, "utf-8"):
        try:
            return data.decode(candidate)
        except (LookupError, UnicodeDecodeError):
            continue
    return data.decode("latin-1")


@dataclass
class _Field:
    """One structured field read both ways: comments dropped (RFC 822, as clamd reads it) and kept (as
    Python's email and many clients read parameters)."""

    kinds: list[str]  # the type (Content-Type) or disposition, lower case; "" when invalid
    params: _Params


def _structured(value: str, *, is_type: bool) -> _Field:
    kinds: list[str] = []
    params = _Params()
    for comments in (True, False):
        segments = _segments(value, comments)
        kind = re.sub(r"\s+", "", segments[0]).lower()
        if is_type and not _TYPE.match(kind):
            kind = ""  # RFC 2045 §5.2: an invalid Content-Type is taken as text/plain
        if kind not in kinds:
            kinds.append(kind)
        _parameters(segments[1:], params)
    return _Field(kinds, params)


def _encodings(values: list[str]) -> list[str]:
    """Every Content-Transfer-Encoding a reader could take from these fields, lower case."""
    found: list[str] = []
    for value in values:
        for comments in (True, False):
            token = _unquote(_segments(value, comments)[0] if comments else value).strip().lower()
            if token not in found:
                found.append(token)
    return found or ["7bit"]


# --- File names (RFC 2047 encoded words, which clients decode in parameters too) ------------------------------

_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")


def decode_words(text: str) -> str:
    """RFC 2047 encoded words decoded; the white space between two adjacent ones dropped (§6.2)."""
    if "=?" not in text:
        return text
    out, last, previous_word = [], 0, False
    for match in _ENCODED_WORD.finditer(text):
        between = text[last:match.start()]
        if not (previous_word and not between.strip()):
            out.append(between)
        charset, kind, data = match.group(1).split("*")[0], match.group(2).upper(), match.group(3)
        if kind == "B":
            raw = _base64_readings(data.encode("latin-1", "replace"))[0]
        else:
            raw = binascii.a2b_qp(data.encode("latin-1", "replace"), header=True)
        out.append(_text(raw, charset))
        last, previous_word = match.end(), True
    out.append(text[last:])
    return "".join(out)


def _as_text(value: str) -> str:
    """A field's value, read as Latin-1 to keep its bytes, as the UTF-8 it usually is (RFC 6532); an RFC 2231
    value is text already."""
    try:
        return _text(value.encode("latin-1"))
    except UnicodeEncodeError:
        return value


def _names(values: list[str]) -> list[str]:
    """Every name a reader could show for these values: decoded (RFC 2047) first, then as written."""
    names: list[str] = []
    for value in values:
        text = _as_text(value)
        for name in (decode_words(text), text):
            if name and name not in names:
                names.append(name)
    return names


# --- Bodies --------------------------------------------------------------------------------------------------

_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/]+")


def _base64_chunk(data: bytes) -> bytes:
    data = _NOT_BASE64.sub(b"", data)
    data = data[: len(data) - len(data) % 4] if len(data) % 4 == 1 else data
    try:
        return binascii.a2b_base64(data + b"=" * (-len(data) % 4))
    except binascii.Error:
        return b""


def _base64_readings(data: bytes) -> list[bytes]:
    """Base64 decoded as readers do: characters outside the alphabet skipped; up to the first padding (as
    Python's binascii and many clients) and, when more follows it, past it as well (as others)."""
    stripped = data.rstrip(b"= \t\r\n")
    if b"=" not in stripped:
        try:
            return [binascii.a2b_base64(data)]
        except binascii.Error:
            return [_base64_chunk(data)]
    pieces = [piece for piece in re.split(rb"=+", data) if _NOT_BASE64.sub(b"", piece)]
    decoded = [_base64_chunk(piece) for piece in pieces]
    return [decoded[0], b"".join(decoded)] if len(decoded) > 1 else decoded[:1]


def _uudecode(data: bytes) -> bytes:
    out = bytearray()
    inside = False
    for line in data.splitlines():
        if not inside:
            inside = line.startswith(b"begin ")
            continue
        if line.strip() in (b"end", b"`", b""):
            if line.strip() == b"end":
                break
            continue
        try:
            out += binascii.a2b_uu(line)
        except binascii.Error:
            # As Python's email: a line padded wrongly by some encoders, decoded by its length byte.
            length = ((line[0] - 32) & 63) * 4 + 5
            try:
                out += binascii.a2b_uu(line[: length // 3])
            except (binascii.Error, IndexError):
                continue
    return bytes(out)


def _decoded(buf: bytes, start: int, end: int, encoding: str) -> list[bytes]:
    body = buf[start:end]
    if encoding == "base64":
        return _base64_readings(body)
    if encoding == "quoted-printable":
        return [binascii.a2b_qp(body)]
    if encoding in UUENCODE:
        return [_uudecode(body)]
    return [body]


# --- Multipart bodies (RFC 2046 §5.1.1) -------------------------------------------------------------------

@dataclass
class _Delimiter:
    before: int  # where the part before it ends (the line break in front belongs to the delimiter)
    after: int  # where the part after it begins
    close: bool  # "--boundary--"
    exact: bool  # nothing but white space after the boundary (and its "--")


def _delimiters(buf: bytes, start: int, end: int, boundary: bytes, limit: int) -> list[_Delimiter]:
    """Every line that begins with "--" and the boundary: RFC 2046's reading ("it is sufficient that the
    boundary appear in its entirety following the CRLF"); `exact` tells Python's stricter one apart."""
    needle = b"--" + boundary
    found: list[_Delimiter] = []
    line_start = start if buf.startswith(needle, start) else -1
    while len(found) <= limit:
        if line_start < 0:
            hit = buf.find(b"\n" + needle, start, end)
            if hit < 0:
                break
            line_start = hit + 1
        before = line_start
        if line_start > start:
            before = line_start - 1
            if before > start and buf[before - 1] == 13:
                before -= 1
        newline = buf.find(b"\n", line_start, end)
        line_end = end if newline < 0 else newline
        rest = buf[line_start + len(needle):line_end].rstrip(b"\r")
        close = rest.startswith(b"--")
        tail = rest[2:] if close else rest
        found.append(_Delimiter(before, end if newline < 0 else newline + 1, close, not tail.strip(b" \t")))
        start, line_start = line_end, -1
    return found


def _delimiters_any_break(buf: bytes, start: int, end: int, boundary: bytes, limit: int) -> list[_Delimiter]:
    """The same with a bare CR taken as a line break too, as Python's email splits lines (RFC 5322 has CRLF
    only)."""
    found: list[_Delimiter] = []
    pattern = re.compile(b"--" + re.escape(boundary) + rb"([^\r\n]*)(\r\n|\r|\n)?")
    for match in pattern.finditer(buf, start, end):
        at = match.start()
        if at > start and buf[at - 1] not in b"\r\n":
            continue
        before = at
        if at > start:
            before = at - 2 if buf[at - 1] == 10 and at - 2 >= start and buf[at - 2] == 13 else at - 1
        rest = match.group(1)
        close = rest.startswith(b"--")
        tail = rest[2:] if close else rest
        found.append(_Delimiter(before, match.end(), close, not tail.strip(b" \t")))
        if len(found) > limit:
            break
    return found


_DELIMITER_LIKE = re.compile(rb"^--[0-9A-Za-z'()+_,./:=?-][0-9A-Za-z'()+_,./:=? -]{0,69}\r?$", re.MULTILINE)


def _regions(delimiters: list[_Delimiter], end: int) -> list[tuple[int, int]]:
    """The parts between consecutive delimiters; after a close delimiter too (the epilogue of RFC 2046, which
    some readers go on parsing), and up to the end when the close delimiter is missing."""
    regions = [(a.after, b.before) for a, b in zip(delimiters, delimiters[1:], strict=False)]
    if delimiters and not delimiters[-1].close:
        regions.append((delimiters[-1].after, end))
    return regions


# --- The walk ------------------------------------------------------------------------------------------------

def read(raw: bytes, limits: MimeLimits | None = None) -> Structure:
    """The message's leaves, decoded every way a reader would, and whatever keeps it from being read one way
    only (`unscannable`). Never raises on malformed input."""
    limits = limits or MimeLimits()
    structure = Structure()
    stack = [_Entity(raw, 0, len(raw), 0, "", top=True)]
    seen: set[tuple[int, int, int]] = set()
    buffers: list[bytes] = [raw]  # decoded buffers stay referenced: their ids key `seen`
    while stack:
        entity = stack.pop()
        key = (id(entity.buf), entity.start, entity.end)
        if key in seen:
            continue  # two readings that found the same part
        seen.add(key)
        structure.parts += 1
        if structure.parts > limits.max_parts:
            structure.unscannable.append(f"more than {limits.max_parts} MIME parts")
            break
        try:
            children = _read_entity(entity, structure, buffers, limits)
        except Exception as exc:  # noqa: BLE001 - whatever this reading missed, the message is not clean
            structure.unscannable.append(f"{_label(entity.number)}: could not be read ({exc.__class__.__name__})")
            break
        if children and entity.depth + 1 > limits.max_depth:
            structure.unscannable.append(f"MIME parts nested deeper than {limits.max_depth} levels")
            break
        stack.extend(reversed(children))
    return structure


def _read_entity(entity: _Entity, structure: Structure, buffers: list[bytes], limits: MimeLimits) -> list[_Entity]:
    """The entity's children (parts, an enclosed message), its leaf added to `structure` when it is one."""
    header = _read_header(entity.buf, entity.start, entity.end, entity.top)
    if header.bare_cr:
        structure.unscannable.append(f"{_label(entity.number)}: a bare CR in the header section, so readers "
                                     "differ on where its fields end")
        return []
    readings = [(header.fields, [header.body_start])]
    if header.early_body_start is not None:
        label = _label(entity.number)
        if any(late and name in CONTENT_FIELDS for name, _, late in header.fields):
            # Content- fields after that line: a reader that ends the header there sees another part.
            structure.notes.append(f"{label}: a header line that is no field before its Content- fields; read "
                                   "with and without the fields after it")
            readings.append(([f for f in header.fields if not f[2]], [header.early_body_start]))
        else:
            structure.notes.append(f"{label}: a header line that is no field; the body read from both places")
            readings = [(header.fields, [header.body_start, header.early_body_start])]
    children: list[_Entity] = []
    leaves: list[Leaf] = []
    for fields, body_starts in readings:
        found = _interpret(entity, fields, body_starts, structure, buffers, limits)
        if found is None:
            return []
        children += found[0]
        leaves += found[1]
    if leaves:
        leaf = leaves[0]
        for other in leaves[1:]:
            leaf.types += [t for t in other.types if t not in leaf.types]
            leaf.names += [n for n in other.names if n not in leaf.names]
            leaf.bodies += [b for b in other.bodies if b not in leaf.bodies]
            leaf.decoded = leaf.decoded or other.decoded
        structure.leaves.append(leaf)
    return children


def _interpret(entity: _Entity, fields: list[tuple[bytes, str, bool]], body_starts: list[int], structure: Structure,
               buffers: list[bytes], limits: MimeLimits) -> tuple[list[_Entity], list[Leaf]] | None:
    """One reading of the entity's header: its children and its leaf; None when it is unscannable."""
    buf, label = entity.buf, _label(entity.number)
    content = {name: [v for n, v, _ in fields if n == name] for name in CONTENT_FIELDS}
    types = [_structured(v, is_type=True) for v in content[b"content-type"]]
    dispositions = [_structured(v, is_type=False) for v in content[b"content-disposition"]]
    for conflict in {c for f in types + dispositions for c in f.params.conflicts}:
        structure.unscannable.append(f"{label}: RFC 2231 continuations of {conflict!r} that conflict")
        return None
    kinds = [k or "text/plain" for f in types for k in f.kinds] or [entity.default_type]
    kinds = list(dict.fromkeys(kinds))
    encodings = _encodings(content[b"content-transfer-encoding"])
    if len(content[b"content-type"]) > 1 and len(kinds) > 1:
        structure.notes.append(f"{label}: Content-Type fields that differ ({', '.join(kinds)}); every reading read")
    if len(encodings) > 1:
        structure.notes.append(f"{label}: Content-Transfer-Encodings that differ ({', '.join(encodings)}); "
                               "decoded each way")
    unknown = [e for e in encodings if e not in KNOWN_ENCODINGS]
    if unknown:
        structure.notes.append(f"{label}: unknown Content-Transfer-Encoding {unknown[0]!r}, taken as it is")

    children: list[_Entity] = []
    leaf_types = [k for k in kinds if not k.startswith(("multipart/", "message/rfc822", "message/global"))]
    if any(k.startswith("multipart/") for k in kinds):
        found = _multipart_children(entity, body_starts[0], types, encodings, structure, buffers, limits)
        if found is None:
            return None
        if not found:
            leaf_types = leaf_types or ["text/plain"]
        children += found
    if any(k in ("message/rfc822", "message/global") for k in kinds):
        for body in _bodies(buf, body_starts[0], entity.end, encodings):
            if body is not buf:
                buffers.append(body)
            start, end = (body_starts[0], entity.end) if body is buf else (0, len(body))
            children.append(_Entity(body, start, end, entity.depth + 1, entity.number, top=True))
    if not leaf_types:
        return children, []
    names = _names([v for f in dispositions for v in f.params.get("filename")]
                   + [v for f in types for v in f.params.get("name")])
    bodies: list[bytes] = []
    for start in body_starts:
        for encoding in encodings:
            for body in _decoded(buf, start, entity.end, encoding):
                if body not in bodies:
                    bodies.append(body)
    decoded = any(e not in IDENTITY and e in KNOWN_ENCODINGS for e in encodings)
    return children, [Leaf(entity.number, leaf_types, names, bodies, decoded)]


def _bodies(buf: bytes, start: int, end: int, encodings: list[str]) -> list[bytes]:
    """A container's body: the buffer itself (taken as it is), and its decoded readings when a
    Content-Transfer-Encoding other than an identity one is declared (RFC 2045 §6.4 forbids it for multipart,
    some readers decode it all the same)."""
    bodies: list[bytes] = []
    if any(e not in KNOWN_ENCODINGS or e in IDENTITY for e in encodings):
        bodies.append(buf)
    for encoding in encodings:
        if encoding in KNOWN_ENCODINGS and encoding not in IDENTITY:
            bodies += _decoded(buf, start, end, encoding)
    return bodies or [buf]


def _multipart_children(entity: _Entity, body_start: int, types: list[_Field], encodings: list[str],
                        structure: Structure, buffers: list[bytes], limits: MimeLimits) -> list[_Entity] | None:
    """The parts of a multipart body: those of every boundary a reader could take and every delimiter
    reading. [] when no delimiter is there (the body is then read as text); None when unscannable."""
    label = _label(entity.number)
    boundaries = [b for f in types if any(k.startswith("multipart/") for k in f.kinds)
                  for b in f.params.get("boundary") if b]
    boundaries = list(dict.fromkeys(boundaries))
    if len(boundaries) > 1:
        structure.notes.append(f"{label}: boundaries that differ ({', '.join(map(repr, boundaries))}); the parts "
                               "of each read")
    default = "message/rfc822" if any("multipart/digest" in f.kinds for f in types) else "text/plain"
    children: list[_Entity] = []
    regions_seen: set[tuple[int, int, int]] = set()
    found_any = False
    for body in _bodies(entity.buf, body_start, entity.end, encodings):
        if body is not entity.buf:
            buffers.append(body)
            structure.notes.append(f"{label}: a multipart with a Content-Transfer-Encoding; read decoded as well")
        start, end = (body_start, entity.end) if body is entity.buf else (0, len(body))
        for boundary in boundaries:
            delimiters = _delimiters(body, start, end, boundary.encode("latin-1", "replace"), limits.max_parts)
            if not delimiters:
                continue
            found_any = True
            readings = [delimiters]
            if body.find(b"\r--" + boundary.encode("latin-1", "replace"), start, end) >= 0:
                with_cr = _delimiters_any_break(body, start, end, boundary.encode("latin-1", "replace"),
                                                limits.max_parts)
                if [(d.before, d.after) for d in with_cr] != [(d.before, d.after) for d in delimiters]:
                    structure.notes.append(f"{label}: a delimiter after a bare CR; the parts of both readings read")
                    readings.append(with_cr)
            if not all(d.exact for d in delimiters):
                structure.notes.append(f"{label}: a delimiter line with text after the boundary; the parts of "
                                       "both readings read")
                readings.append([d for d in delimiters if d.exact])
            if any(d.close for d in delimiters[:-1]):
                structure.notes.append(f"{label}: delimiters after the close delimiter; those parts read too")
            elif not delimiters[-1].close:
                structure.notes.append(f"{label}: no close delimiter; the last part runs to the end")
            for reading in readings:
                for region in _regions(reading, end):
                    if (id(body), *region) not in regions_seen:
                        regions_seen.add((id(body), *region))
                        children.append(_Entity(body, *region, entity.depth + 1, "", default))
    if not found_any:
        if _DELIMITER_LIKE.search(entity.buf, body_start, entity.end):
            structure.unscannable.append(f"{label}: a multipart whose boundary the body never uses, with other "
                                         "delimiter-like lines in it")
            return None
        structure.notes.append(f"{label}: a multipart without parts; its body read as text")
        return []
    prefix = f"{entity.number}." if entity.number else ""
    for i, child in enumerate(children, 1):
        child.number = f"{prefix}{i}"
    return children
