from django.apps import AppConfig


class GatewayConfig(AppConfig):
    name = "gateway"
    verbose_name = "Mail flow"

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers the system checks of the scan's limits)
