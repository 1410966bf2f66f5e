"""The limits of the gateway's own reading of a message (appliance/settings.py, Scanners; the threat model in
docs/security-scanning.md): reaching one makes the message unscannable, held by the mail-flow action for
unscannable mail, never delivered as clean."""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings

from .archives import ArchiveLimits
from .mime import MimeLimits


@dataclass(frozen=True)
class ScanLimits:
    mime: MimeLimits
    archives: ArchiveLimits
    max_decompressed_bytes: int

    @classmethod
    def from_settings(cls) -> ScanLimits:
        return cls(
            mime=MimeLimits(max_parts=settings.SCAN_MAX_PARTS, max_depth=settings.SCAN_MAX_DEPTH),
            archives=ArchiveLimits(max_members=settings.SCAN_MAX_ARCHIVE_MEMBERS,
                                   max_depth=settings.SCAN_MAX_ARCHIVE_DEPTH,
                                   max_ratio=settings.SCAN_MAX_COMPRESSION_RATIO,
                                   max_member_size=settings.CLAMD_STREAM_MAX_LENGTH),
            max_decompressed_bytes=settings.SCAN_MAX_DECOMPRESSED_BYTES,
        )
