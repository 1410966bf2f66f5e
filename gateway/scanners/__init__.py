"""Scanners the pipeline asks about a message: ClamAV, SpamAssassin, the attachment rules."""


class ScannerUnavailable(Exception):
    """A scanner did not answer (refused, timed out, broken reply): try the scan again later."""
