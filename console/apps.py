from django.apps import AppConfig


class ConsoleConfig(AppConfig):
    """The administrator's console: the /manage/ pages, the site login (throttled and audited), the Django
    admin of the mail path's tables, and what every page says about the appliance itself."""

    name = "console"
    verbose_name = "Console"

    def ready(self) -> None:
        from . import signals  # noqa: F401  (connects the audit of logins)
