import os

from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "appliance.settings")

app = Celery("appliance")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@signals.task_prerun.connect
@signals.task_postrun.connect
def _database_connections(**kwargs) -> None:
    # Connections are reused across tasks (CELERY_DB_REUSE_MAX); this drops the old and the broken ones.
    from django.db import close_old_connections

    close_old_connections()
