"""What every page says about the appliance itself: a scan that is off is said plainly."""

from django.conf import settings


def scanner_status(request) -> dict:
    if not getattr(request, "user", None) or not request.user.is_authenticated:
        return {}
    warnings = []
    if not settings.CLAMD_URL:
        warnings.append("Virus scan is off: CLAMD_URL is not configured. Mail is delivered without a virus scan.")
    if not settings.SPAMD_URL:
        warnings.append("Spam scan is off: SPAMD_URL is not configured. Mail is delivered without a spam score.")
    return {"scanner_warnings": warnings}
