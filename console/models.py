"""The console's own table: the recovery codes of two-factor login (console/twofactor.py).

The TOTP devices themselves are django_otp's (django_otp.plugins.otp_totp.TOTPDevice)."""

from __future__ import annotations

from django.conf import settings
from django.db import models


class RecoveryCode(models.Model):
    """One one-time code that stands in for the authenticator app once. Only its keyed hash is kept: the code
    is shown to its owner once, when it is made, and cannot be read back from the database."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="recovery_codes")
    code_hash = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)
    used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["user", "code_hash"])]

    def __str__(self) -> str:
        return f"recovery code of {self.user_id} ({'used' if self.used_at else 'unused'})"
