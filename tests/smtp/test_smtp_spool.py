"""A large message is spooled to disk while it arrives, not held in memory: the server keeps a few hundred
KiB per connection (SMTP_DATA_SPOOL_THRESHOLD), the rest in an unlinked file in SMTP_SPOOL_DIR, and stores
exactly what was sent. The memory figures are bench/memory's."""

import os
import socket
import time
from pathlib import Path

from gateway.models import Message, RawMessage


def spool_files(directory: Path) -> list[str]:
    """This process's open files in the spool directory (the server runs in a thread of the test)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(directory)):
            found.append(target)
    return found


def reply(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n") or data.splitlines()[-1][3:4] == b"-":
        data += sock.recv(4096)
    return data


def test_a_large_message_is_spooled_to_an_unlinked_file_while_it_arrives(settings, tmp_path, protected_domain):
    settings.SMTP_SPOOL_DIR = tmp_path / "spool"
    settings.SMTP_DATA_SPOOL_THRESHOLD = 64 * 1024
    from tests.support.servers import GatewayServer

    settings.CELERY_TASK_ALWAYS_EAGER = False
    settings.SMTP_REVERSE_DNS = False
    settings.SMTP_POLICY_TTL = 0
    server = GatewayServer().start()
    try:
        line = b"q" * 998 + b"\r\n"
        message = b"From: <alice@sender.example>\r\nSubject: large\r\n\r\n" + line * 3000  # ~3 MB
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            reply(sock)
            for command in (b"EHLO client.example.net", b"MAIL FROM:<alice@sender.example>",
                            b"RCPT TO:<bob@example.org>", b"DATA"):
                sock.sendall(command + b"\r\n")
                assert reply(sock)[:3] in (b"250", b"354")
            sock.sendall(message[:2 * 1024 * 1024])
            deadline = time.monotonic() + 10
            while not spool_files(settings.SMTP_SPOOL_DIR) and time.monotonic() < deadline:
                time.sleep(0.05)
            spooled = spool_files(settings.SMTP_SPOOL_DIR)
            assert spooled and all(name.endswith("(deleted)") for name in spooled)
            assert os.listdir(settings.SMTP_SPOOL_DIR) == []  # nobody can open it by a name
            assert oct(os.stat(settings.SMTP_SPOOL_DIR).st_mode & 0o777) == "0o700"
            sock.sendall(message[2 * 1024 * 1024:] + b".\r\n")
            answer = reply(sock)
            assert answer.startswith(b"250 2.0.0"), answer
            sock.sendall(b"QUIT\r\n")
        queue_id = answer.split()[-1].decode()
        stored = RawMessage.objects.get(message=Message.objects.get(queue_id=queue_id))
        assert bytes(stored.data) == message
        deadline = time.monotonic() + 5
        while spool_files(settings.SMTP_SPOOL_DIR) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert spool_files(settings.SMTP_SPOOL_DIR) == []  # closed once stored
    finally:
        server.stop()
