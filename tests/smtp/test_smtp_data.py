"""The message data of DATA, read up to the lone dot in as few reads as it arrives (gateway/smtp/data.py):
the same message, the same refusals as aiosmtpd's line-by-line reading, and never a byte of the next
command taken, however the client's bytes are cut into packets; the same again when the data is spooled
piece by piece (beyond the spool's threshold), with a reader as small as the server's."""

import asyncio
import random

import pytest

from gateway.smtp.data import DataMemory, Spool, read_message_data

LIMIT = 1024 * 1024  # the server's line limit, also its reader's buffer limit


def reference(stream: bytes, size_limit: int | None, line_limit: int) -> tuple[bytes, str, bytes]:
    """What aiosmtpd's line loop makes of the bytes after 354: (content, error, what is left for the next
    command). Lines end at CRLF; a lone dot ends the data; a leading dot is removed."""
    lines, rest, size, error = [], stream, 0, ""
    while True:
        end = rest.index(b"\r\n") + 2
        line, rest = rest[:end], rest[end:]
        if line == b".\r\n":
            break
        size += len(line)
        if len(line) > line_limit and not error:
            error = "500 Line too long (see RFC5321 4.5.3.1.6)"
        lines.append(line[1:] if line.startswith(b".") else line)
    if size_limit and size > size_limit:
        error = "552 Error: Too much mail data"
    return (b"" if error else b"".join(lines)), error, rest


def read(chunks: list[bytes], *, size_limit: int | None = None, line_limit: int = LIMIT, threshold: int | None = None,
         reader_limit: int = LIMIT) -> tuple[bytes, str, bytes]:
    """What read_message_data makes of the chunks; `threshold`: spooled beyond that many bytes."""
    async def go():
        reader = asyncio.StreamReader(limit=reader_limit)

        async def feed():
            for chunk in chunks:
                reader.feed_data(chunk)
                await asyncio.sleep(0)  # the reader sees each packet on its own
            reader.feed_eof()

        feeding = asyncio.create_task(feed())
        spool = Spool(threshold) if threshold is not None else None
        data = await asyncio.wait_for(read_message_data(reader, size_limit=size_limit, line_limit=line_limit,
                                                        spool=spool), 10)
        await feeding
        try:
            return data.content, data.error, await reader.read()
        finally:
            data.close()

    return asyncio.run(go())


def cut(stream: bytes, rng: random.Random) -> list[bytes]:
    chunks, at = [], 0
    while at < len(stream):
        step = rng.choice((1, 1, 2, 3, 4, 5, 7, 64, 4096))
        chunks.append(stream[at:at + step])
        at += step
    return chunks


def test_a_message_then_the_next_command_in_one_packet():
    stream = b"Subject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n"
    assert read([stream]) == (b"Subject: hi\r\n\r\nbody\r\n", "", b"QUIT\r\n")


def test_an_empty_message_and_one_whose_last_line_is_empty():
    assert read([b".\r\nRSET\r\n"]) == (b"", "", b"RSET\r\n")
    assert read([b"\r\n.\r\n"]) == (b"\r\n", "", b"")
    assert read([b"a\r\n\r\n.\r\n"]) == (b"a\r\n\r\n", "", b"")


def test_dot_stuffing_is_undone():
    stream = b"..\r\n..leading\r\n.x\r\nmid.dle\r\n...\r\n.\r\n"
    assert read([stream]) == (b".\r\n.leading\r\nx\r\nmid.dle\r\n..\r\n", "", b"")


@pytest.mark.parametrize("stream", [
    b"Subject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n",
    b".\r\nQUIT\r\n",
    b"\r\n\r\n.\r\n",
    b"a\r\n.\r\r\n.\r\n",
    b"a\r\n.\rx\r\n.\r\nMAIL FROM:<a@b>\r\n",
    b"a\r\n.\r\n.\r\n",
    b"\r\r\n.\n\r\n.\r\n",
])
def test_the_end_found_wherever_the_packets_are_cut(stream):
    expected = reference(stream, None, LIMIT)
    for position in range(1, len(stream)):
        assert read([stream[:position], stream[position:]]) == expected, position
    assert read([bytes([b]) for b in stream]) == expected


def test_random_data_and_packets_as_aiosmtpd_reads_them():
    rng = random.Random(2920)
    alphabet = b"..\r\n\r\nab ."
    for _ in range(400):
        body = bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 60)))
        stream = body + (b"" if body.endswith(b"\r\n") or not body else b"\r\n") + b".\r\n" + b"NEXT\r\n"
        if not body:
            stream = b".\r\nNEXT\r\n"
        expected = reference(stream, None, LIMIT)
        assert read(cut(stream, rng)) == expected, stream


def test_over_the_size_limit_is_refused_after_the_whole_data_and_at_the_limit_is_not():
    line = b"x" * 98 + b"\r\n"
    stream = line * 10 + b".\r\nQUIT\r\n"
    assert read([stream], size_limit=1000) == (line * 10, "", b"QUIT\r\n")
    assert read([stream], size_limit=999) == (b"", "552 Error: Too much mail data", b"QUIT\r\n")
    rng = random.Random(5)
    assert read(cut(stream, rng), size_limit=500) == (b"", "552 Error: Too much mail data", b"QUIT\r\n")


def test_a_size_limit_of_zero_is_no_limit():
    stream = b"Subject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n"
    for limit in (0, None):
        assert read([stream], size_limit=limit) == (b"Subject: hi\r\n\r\nbody\r\n", "", b"QUIT\r\n")
        assert read(cut(stream, random.Random(1)), size_limit=limit)[0] == b"Subject: hi\r\n\r\nbody\r\n"


def test_a_message_larger_than_the_readers_buffer_is_read_whole():
    line = b"y" * 76 + b"\r\n"
    body = b"".join(b"." + line if n % 7 == 0 else line for n in range(60_000))  # ~4.7 MiB
    stream = body + b".\r\nQUIT\r\n"
    content, error, rest = read([stream[i:i + 65536] for i in range(0, len(stream), 65536)])
    assert (error, rest) == ("", b"QUIT\r\n")
    assert content == reference(stream, None, LIMIT)[0]


def test_a_line_over_the_line_limit_is_refused_and_one_at_it_is_not():
    at_limit = b"z" * (LIMIT - 2) + b"\r\n"
    assert read([b"a\r\n", at_limit, b".\r\n"]) == (b"a\r\n" + at_limit, "", b"")
    over = b"z" * (LIMIT - 1) + b"\r\n"
    assert read([b"a\r\n", over, b"b\r\n.\r\nQUIT\r\n"]) == (
        b"", "500 Line too long (see RFC5321 4.5.3.1.6)", b"QUIT\r\n")


def test_a_client_that_goes_away_mid_data_ends_the_read():
    async def go():
        reader = asyncio.StreamReader(limit=LIMIT)
        reader.feed_data(b"Subject: cut\r\nhalf a li")
        reader.feed_eof()
        await read_message_data(reader, size_limit=None, line_limit=LIMIT)

    with pytest.raises(asyncio.IncompleteReadError):
        asyncio.run(go())


# --- Spooled: the data unstuffed piece by piece into a spool (memory, then an unlinked file) -----------------

SPOOLED = [0, 1, 3, 5, 64]  # spool thresholds: from the first byte on, and a few bytes in


@pytest.mark.parametrize("threshold", SPOOLED)
def test_spooled_random_data_and_packets_as_aiosmtpd_reads_them(threshold):
    rng = random.Random(threshold)
    alphabet = b"..\r\n\r\nab ."
    for _ in range(300):
        body = bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 80)))
        stream = body + (b"" if body.endswith(b"\r\n") or not body else b"\r\n") + b".\r\n" + b"NEXT\r\n"
        if not body:
            stream = b".\r\nNEXT\r\n"
        expected = reference(stream, None, LIMIT)
        assert read(cut(stream, rng), threshold=threshold) == expected, stream


@pytest.mark.parametrize("threshold", SPOOLED)
def test_spooled_the_end_found_wherever_the_packets_are_cut(threshold):
    for stream in (b"..\r\n..leading\r\n.x\r\nmid.dle\r\n...\r\n.\r\nQUIT\r\n", b"\r\r\n.\n\r\n.\r\n",
                   b"a\r\n.\rx\r\n.\r\nMAIL FROM:<a@b>\r\n", b".\r\nRSET\r\n"):
        expected = reference(stream, None, LIMIT)
        for position in range(1, len(stream)):
            assert read([stream[:position], stream[position:]], threshold=threshold) == expected, (stream, position)
        assert read([bytes([b]) for b in stream], threshold=threshold) == expected


def test_spooled_limits_are_those_of_the_whole_data():
    line = b"x" * 98 + b"\r\n"
    stream = line * 10 + b".\r\nQUIT\r\n"
    rng = random.Random(7)
    assert read(cut(stream, rng), size_limit=1000, threshold=10) == (line * 10, "", b"QUIT\r\n")
    assert read(cut(stream, rng), size_limit=999, threshold=10) == (b"", "552 Error: Too much mail data", b"QUIT\r\n")
    at_limit, over = b"z" * 98 + b"\r\n", b"z" * 99 + b"\r\n"
    assert read(cut(b"a\r\n" + at_limit + b".\r\n", rng), line_limit=100, threshold=1)[1] == ""
    assert read(cut(b"a\r\n" + over + b"b\r\n.\r\nQUIT\r\n", rng), line_limit=100, threshold=1) == (
        b"", "500 Line too long (see RFC5321 4.5.3.1.6)", b"QUIT\r\n")


def test_a_large_message_through_the_servers_small_reader_goes_to_an_unlinked_file(tmp_path):
    """Beyond the threshold the data is on disk, in a file nobody else can open (unlinked at once), and
    the reader never buffers more than its limit: what the server holds per connection stays small."""
    line = b"y" * 76 + b"\r\n"
    body = b"".join(b"." + line if n % 7 == 0 else line for n in range(30_000))  # ~2.3 MiB
    stream = body + b".\r\nQUIT\r\n"

    async def go():
        reader = asyncio.StreamReader(limit=64 * 1024)
        spool = Spool(256 * 1024, directory=str(tmp_path))
        for at in range(0, len(stream), 65536):
            reader.feed_data(stream[at:at + 65536])
        reader.feed_eof()
        data = await read_message_data(reader, size_limit=None, line_limit=LIMIT, spool=spool)
        assert spool.on_disk and list(tmp_path.iterdir()) == []  # the file has no name
        content = data.content
        data.close()
        return content, await reader.read()

    content, rest = asyncio.run(go())
    assert content == reference(stream, None, LIMIT)[0] and rest == b"QUIT\r\n"


def test_the_data_memory_makes_a_message_wait_for_room_and_lets_a_large_one_go_alone():
    async def go():
        memory = DataMemory(100)
        order = []

        async def hold(name: str, amount: int, seconds: float) -> None:
            async with memory.reserve(amount):
                order.append(f"{name} in")
                await asyncio.sleep(seconds)
                order.append(f"{name} out")

        first = asyncio.ensure_future(hold("a", 60, 0.05))
        await asyncio.sleep(0.01)
        await asyncio.gather(hold("b", 60, 0), first, hold("huge", 500, 0))
        return order, memory.in_use

    order, left = asyncio.run(go())
    assert order.index("a out") < order.index("b in")  # 60 + 60 > 100: b waited for a
    assert "huge in" in order and left == 0  # larger than the whole budget: alone, not never
