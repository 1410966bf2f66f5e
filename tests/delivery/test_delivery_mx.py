"""Delivery to a domain that is not ours goes by its MX records, looked up through the configured resolver."""

import pytest

from gateway.delivery.routing import NoRoute, mx_hosts
from tests.support.dnsstub import DNSStub


@pytest.fixture
def resolver_at(settings):
    def point(stub: DNSStub):
        settings.DNS_NAMESERVERS = [stub.host]
        settings.DNS_PORT = stub.port
        settings.DNS_TIMEOUT = 2
    return point


def test_mx_hosts_by_preference_implicit_mx_and_null_mx(resolver_at):
    zones = {
        "two.example": [{"MX": [20, "b.two.example"]}, {"MX": [10, "a.two.example"]}],
        "plain.example": [{"A": "192.0.2.7"}],
        "nomail.example": [{"MX": [0, "."]}],
    }
    with DNSStub(zones) as stub:
        resolver_at(stub)
        assert mx_hosts("two.example") == ["a.two.example", "b.two.example"]
        assert mx_hosts("plain.example") == ["plain.example"]
        with pytest.raises(NoRoute):
            mx_hosts("nomail.example")
        with pytest.raises(NoRoute):
            mx_hosts("missing.example")
