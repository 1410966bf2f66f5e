"""The quarantine's own table: bulk actions on quarantined mail, worked in chunks."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone


class BulkJob(models.Model):
    """One bulk action on quarantined mail (a selection, or everything a filter matches), worked in chunks.

    The job remembers *what* was asked (the selection or the filter) rather than a frozen list of ids, and walks
    the matching messages by id with a cursor: a filter matching 100,000 messages costs one row here, and each
    chunk re-applies the owner's scope, so a job never reaches mail its owner may no longer see.
    """

    class Action(models.TextChoices):
        RELEASE = "release", "Release"
        DELETE = "delete", "Delete"
        LEARN_SPAM = "learn_spam", "Learn as spam"
        LEARN_HAM = "learn_ham", "Learn as ham"

    class State(models.TextChoices):
        RUNNING = "running", "Running"
        DONE = "done", "Done"
        FAILED = "failed", "Failed"

    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="bulk_jobs")
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now, help_text="Last progress: a stalled job is resumed")
    finished_at = models.DateTimeField(null=True, blank=True)
    ip = models.GenericIPAddressField(null=True, blank=True)
    action = models.CharField(max_length=10, choices=Action.choices)
    state = models.CharField(max_length=7, choices=State.choices, default=State.RUNNING)
    selection = models.JSONField(null=True, blank=True, help_text="Message ids picked by hand; null: the filter")
    filters = models.JSONField(default=dict, blank=True, help_text="The quarantine filter, for 'all that match'")
    cursor = models.BigIntegerField(default=0, help_text="Messages with an id up to this one are done")
    upto = models.BigIntegerField(null=True, blank=True,
                                  help_text="The last id that matched when the job began: later mail is not part of it")
    total = models.PositiveIntegerField(default=0)
    done = models.PositiveIntegerField(default=0)
    succeeded = models.PositiveIntegerField(default=0)
    skipped = models.PositiveIntegerField(default=0, help_text="No longer quarantined when their turn came")
    failed = models.PositiveIntegerField(default=0)
    errors = models.JSONField(default=list, blank=True, help_text="[queue_id: reason], the first few")

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.get_action_display()} of {self.total} by {self.created_by} ({self.state})"

    @property
    def finished(self) -> bool:
        return self.state != self.State.RUNNING
