import os

from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "appliance.settings")

app = Celery("appliance")
app.config_from_object("django.conf:settings", namespace="CELERY")
# Threads, not forked processes, unless `--pool` or CELERY_WORKER_POOL says otherwise: a task spends
# its time waiting on clamd, spamd, PostgreSQL and the next hop, and the prefork pool's hand-over of
# every task from the parent to a child (pipes, pickling, a second process woken) cost ~0.7 ms of CPU
# per message in bench/pipeline, a sixth of the worker's share. Each thread has its own database
# connection and clamd client.
app.conf.worker_pool = os.getenv("CELERY_WORKER_POOL", "threads")
app.autodiscover_tasks()


@signals.task_prerun.connect
@signals.task_postrun.connect
def _database_connections(**kwargs) -> None:
    # Connections are reused across tasks (CELERY_DB_REUSE_MAX); this drops the old and the broken ones.
    from django.db import close_old_connections

    close_old_connections()
