"""The scan of a message: the scanners (clamav, spamassassin, attachments), the verdict they give
(verdict), writing it (record), and the task's course from the claim to the delivery (run)."""


class ScannerUnavailable(Exception):
    """A scanner did not answer (refused, timed out, broken reply): try the scan again later."""
