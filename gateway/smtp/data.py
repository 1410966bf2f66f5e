"""Reading the message data of DATA: up to the lone dot, in as few pieces as the client sent it, and never
more of it in memory than the server can afford.

aiosmtpd reads the data section one line at a time (a `readuntil(b"\\r\\n")` and some Python per line):
~5 µs a line, so a 100 KiB message of 2,000 lines costs the SMTP server ~10 ms before anything is done
with it, and even a 4 KiB one a fifth of all the server spends on it. Here the end-of-data sequence
(CRLF . CRLF, RFC 5321 §4.1.1.4) is looked for in the stream itself, so a message that has arrived is
taken in one read, and never a byte beyond the end of its data: whatever a client pipelines after it
(RSET, MAIL, QUIT) stays for the command loop.

A message that does not arrive in one read is dot-unstuffed as it comes and kept in a `Spool`: in memory
up to SMTP_DATA_SPOOL_THRESHOLD bytes, then in an unlinked temporary file (SMTP_SPOOL_DIR), so that a
thousand slow senders of large messages hold a few hundred KiB each, not their messages. The whole
message is read back into memory only to be checked and stored, under the server's `DataMemory` budget
(SMTP_DATA_MEMORY): when the messages being stored at once would exceed it, the next one waits its turn
(its client waits for the reply to its final dot, which RFC 5321 §4.5.3.2.6 gives 10 minutes).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

END_OF_DATA = b"\r\n.\r\n"
READ_SIZE = 64 * 1024  # the most taken from the reader at once when no end of data is in sight
STUFFED = b"\r\n."  # a line that starts with a dot had one added by the client (RFC 5321 §4.5.2)


class Spool:
    """Message data kept in memory up to `threshold` bytes, the rest in an unlinked temporary file."""

    def __init__(self, threshold: int = 256 * 1024, directory: str | None = None):
        self.threshold = threshold
        self.directory = directory
        self.size = 0
        self._chunks: list[bytes] = []
        self._file = None

    @property
    def on_disk(self) -> bool:
        return self._file is not None

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.size += len(data)
        if self._file is None:
            self._chunks.append(data)
            if self.size <= self.threshold:
                return
            # The file is created unlinked, readable by this process only (mode 0600 in a 0700 directory).
            self._file = tempfile.TemporaryFile(dir=self.directory)
            for chunk in self._chunks:
                self._file.write(chunk)
            self._chunks = []
            return
        self._file.write(data)

    def read(self) -> bytes:
        """All of it, as one bytes object."""
        if self._file is None:
            return b"".join(self._chunks)
        self._file.flush()
        self._file.seek(0)
        return self._file.read()

    def close(self) -> None:
        self._chunks = []
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass
class MessageData:
    content_spool: Spool | None = None  # dot-unstuffed (RFC 5321 §4.5.2); None when refused
    error: str = ""  # the reply when the data is refused (once all of it was read), as aiosmtpd words it
    size: int = 0  # bytes of the content
    _content: bytes | None = field(default=None, repr=False)

    @property
    def content(self) -> bytes:
        """The message, read into memory (once)."""
        if self._content is None:
            self._content = self.content_spool.read() if self.content_spool is not None else b""
        return self._content

    def close(self) -> None:
        self._content = None
        if self.content_spool is not None:
            self.content_spool.close()


def _partial_end(tail: bytes) -> int:
    """How many bytes of the end-of-data sequence `tail` ends with (its longest such suffix)."""
    for length in range(min(len(tail), len(END_OF_DATA) - 1), 0, -1):
        if tail.endswith(END_OF_DATA[:length]):
            return length
    return 0


class _Unstuffer:
    """The data as it arrives, dot-unstuffed into a spool, with the length of its longest line.

    It is fed the raw bytes after `354` with a CRLF in front (the data begins at the start of a line), R;
    what it keeps is R without the final ".CRLF" of the end-of-data sequence, unstuffed, without that
    leading CRLF. The last bytes of what it was fed are held back until more comes: the three that may be
    the final ".CRLF", and a CR or CRLF that a dot in the next piece may follow.
    """

    def __init__(self, spool: Spool):
        self.spool = spool
        self.held = b"\r\n"
        self.skip = 2  # the CRLF put in front
        self.line = 0  # length of the line being read, CR LF excluded
        self.longest = 0

    def feed(self, piece: bytes) -> None:
        data = self.held + piece
        keep = 3
        if data[:-3].endswith(b"\r\n"):
            keep += 2
        elif data[:-3].endswith(b"\r"):
            keep += 1
        if len(data) <= keep:
            self.held = data
            return
        self.held = data[-keep:]
        self._take(data[:-keep])

    def finish(self) -> None:
        """The end of data was read: what is held, but the final ".CRLF"."""
        self._take(self.held[:-3])
        self.held = b""

    def _take(self, raw: bytes) -> None:
        lines = raw.split(b"\r\n")
        if len(lines) == 1:
            self.line += len(raw)
        else:
            self.longest = max(self.longest, self.line + len(lines[0]), *map(len, lines[1:-1]))
            self.line = len(lines[-1])
        self.longest = max(self.longest, self.line)
        out = raw.replace(STUFFED, b"\r\n")
        if self.skip:
            taken = min(self.skip, len(out))
            out, self.skip = out[taken:], self.skip - taken
        self.spool.write(out)


async def read_message_data(reader: asyncio.StreamReader, *, size_limit: int | None, line_limit: int,
                            spool: Spool | None = None) -> MessageData:
    """The data after `354`, through the lone dot. Over `size_limit` bytes (0 or None: no limit) gives
    aiosmtpd's `552` reply and a line longer than `line_limit` (CRLF included) its `500`, each only once
    the whole data has been read (RFC 5321 §4.2.5); the data is not kept once it is too large. Data both
    too large and with a too-long line gets the `552` (aiosmtpd answers whichever it met first).

    The data begins at the start of a line: it is read as if a CRLF came before it, so that a lone dot
    as its first line ends it too (an empty message). An end-of-data sequence split between two reads is
    completed by reading exactly the bytes it still needs; only when what was read ends with no part of
    one does the reader look for a whole one, which then lies entirely in what is still to be read.

    A message no larger than the spool's threshold is kept as it came and unstuffed at once; a larger one
    is unstuffed piece by piece into `spool` (by default one that keeps everything in memory).
    """
    spool = spool if spool is not None else Spool(threshold=1 << 62)
    pieces: list[bytes] = []  # what was read, as it came, while it is small enough to keep so
    kept_size = 0
    unstuffer: _Unstuffer | None = None  # once it is not: unstuffed into the spool as it comes
    size = 0
    kept = True
    tail = b"\r\n"
    while True:
        pending = _partial_end(tail)
        if pending:
            needed = END_OF_DATA[pending:]
            piece = await reader.readexactly(len(needed))
            done = piece == needed
        else:
            try:
                piece = await reader.readuntil(END_OF_DATA)
                done = True
            except asyncio.LimitOverrunError as exc:  # no end within the reader's limit: take what is safe
                # At most a reader's limit at a time (what one receive brought can be four times that).
                piece = await reader.read(min(exc.consumed, READ_SIZE))
                done = False
        size += len(piece)
        if kept and size_limit and size > size_limit + 3:  # 0 or None: no limit, as for aiosmtpd
            kept, pieces, unstuffer = False, [], None  # not kept: refused once the data is all in
            spool.close()
        if kept:
            if unstuffer is not None:
                unstuffer.feed(piece)
            else:
                pieces.append(piece)
                kept_size += len(piece)
                if kept_size > spool.threshold:
                    unstuffer = _Unstuffer(spool)
                    while pieces:
                        unstuffer.feed(pieces.pop(0))
        if done:
            break
        tail = (tail + piece)[-(len(END_OF_DATA) - 1):]
        # Not kept alive while the next piece is awaited: a slow sender's session holds its spool, not this.
        piece = b""
    # What was read ends with the dot line; the CRLF before the dot ends the last line of the message.
    if size_limit and size - 3 > size_limit:
        return MessageData(None, "552 Error: Too much mail data")
    if unstuffer is None:
        # Small enough to have been kept as it came (nearly every message): at once.
        raw = b"".join(pieces)[:-3]
        if len(raw) > line_limit - 2 and max(map(len, raw.split(b"\r\n"))) > line_limit - 2:
            return MessageData(None, "500 Line too long (see RFC5321 4.5.3.1.6)")
        if raw.startswith(b"."):
            raw = raw[1:]
        content = raw.replace(STUFFED, b"\r\n")
        return MessageData(None, size=len(content), _content=content)
    unstuffer.finish()
    if unstuffer.longest > line_limit - 2:
        spool.close()
        return MessageData(None, "500 Line too long (see RFC5321 4.5.3.1.6)")
    return MessageData(spool, size=spool.size)


class DataMemory:
    """How many bytes of message data the server holds in memory at once while it checks and stores
    messages: a message waits for room, and one larger than the whole budget goes alone."""

    def __init__(self, budget: int):
        self.budget = budget
        self.in_use = 0
        self._room = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def reserve(self, amount: int) -> AsyncIterator[None]:
        amount = max(0, amount)
        async with self._room:
            await self._room.wait_for(lambda: self.in_use == 0 or self.in_use + amount <= self.budget)
            self.in_use += amount
        try:
            yield
        finally:
            async with self._room:
                self.in_use -= amount
                self._room.notify_all()


def spool_directory(path: str) -> str | None:
    """The directory for spooled message data, made 0700 if it is missing; None (the system's temporary
    directory) when it cannot be made."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)
    except OSError:
        return None
    return path
