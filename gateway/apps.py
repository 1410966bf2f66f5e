from django.apps import AppConfig


class GatewayConfig(AppConfig):
    name = "gateway"
    verbose_name = "Mail flow"

    def ready(self) -> None:
        # The SMTP policy's tables have their admin beside gateway/admin.py (gateway/policy/admin.py).
        from gateway.policy import admin as policy_admin

        policy_admin.register()
