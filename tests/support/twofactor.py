"""Two-factor login in the tests: a confirmed TOTP device for a login, and the codes an authenticator app would
show, computed with django_otp's own TOTP (RFC 6238) from the secret, as a phone would from the QR code."""

from __future__ import annotations

import time
from base64 import b32decode

from django_otp.oath import TOTP
from django_otp.plugins.otp_totp.models import TOTPDevice

from console import twofactor


def code_at(key: bytes, step_index: int, *, step: int = 30, digits: int = 6) -> str:
    """The code of time step `step_index` (Unix time // step)."""
    totp = TOTP(key, step=step, digits=digits)
    totp.time = step_index * step
    return f"{totp.token():0{digits}d}"


def now_step(step: int = 30) -> int:
    return int(time.time()) // step


def key_of(secret: str) -> bytes:
    """The key behind a base32 secret as the enrolment page shows it (spaces and padding optional)."""
    secret = "".join(secret.split()).upper()
    return b32decode(secret + "=" * (-len(secret) % 8))


def fresh_code(device: TOTPDevice) -> str:
    """A code the device accepts now: the current time step's, or the next one's when the current one was used
    already (the device accepts one step either side)."""
    device.refresh_from_db()
    return code_at(device.bin_key, max(now_step(device.step), device.last_t + 1), step=device.step)


def enrol(user) -> tuple[TOTPDevice, list[str]]:
    """A confirmed device and ten recovery codes for `user`, as the enrolment page leaves them."""
    device = TOTPDevice.objects.create(user=user, name="Authenticator app", confirmed=True)
    return device, twofactor.new_recovery_codes(user)
