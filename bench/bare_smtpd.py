"""The baseline of bench/intake: a bare aiosmtpd server that answers 250 to everything and keeps nothing.

It is configured like the product's server (same aiosmtpd, hostname given so that aiosmtpd does not call
socket.getfqdn() per connection, bytes not decoded, SMTPUTF8 on, same size limit), so that the
difference measured is the product's own work: policy, parsing, the PostgreSQL transaction.

    python bench/bare_smtpd.py --listen 127.0.0.1:PORT [--uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from aiosmtpd.smtp import SMTP


class Accept:
    async def handle_DATA(self, server, session, envelope):
        return "250 2.0.0 Ok: queued"


async def main(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    handler = Accept()

    def factory():
        return SMTP(handler, hostname="bare.bench.example", ident="bare aiosmtpd", decode_data=False,
                    enable_SMTPUTF8=True, data_size_limit=25 * 1024 * 1024, timeout=300)

    server = await loop.create_server(factory, host=host, port=port, reuse_address=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"bare aiosmtpd listening on {host}:{port}", flush=True)
    await stop.wait()
    server.close()
    await server.wait_closed()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:2526")
    parser.add_argument("--uvloop", action="store_true")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop

        uvloop.install()
    listen_host, _, listen_port = args.listen.rpartition(":")
    asyncio.run(main(listen_host, int(listen_port)))
