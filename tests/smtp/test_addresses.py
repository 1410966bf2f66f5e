"""Envelope address syntax (RFC 5321 §4.1.2, RFC 6531): what intake accepts is what any next hop reads the
same way; specials outside quotes and stray quotes are refused, as are the relay tricks."""

import pytest

from gateway.smtp.addresses import AddressError, parse_address


@pytest.mark.parametrize("address", [
    "a.b+c@example.org", "o'brien@example.org", '"john doe"@example.org', '"x\\"y"@example.org',
    "jörg@example.org", "user_name-1@sub.example.org", "x@example.org.",
])
def test_addresses_of_the_standard_are_taken(address):
    assert parse_address(address).domain.startswith(("example.org", "sub.example.org"))


@pytest.mark.parametrize("address", [
    "x<y@example.org", "x>@example.org", "x,y@example.org", "x;y@example.org", "x(comment)@example.org",
    "x[1]@example.org", 'x"y@example.org', '"a"b"@example.org', "x\\y@example.org", "a:b@example.org",
    '"tab\there"@example.org',
])
def test_specials_outside_quotes_and_stray_quotes_are_refused(address):
    with pytest.raises(AddressError) as refused:
        parse_address(address)
    assert refused.value.code.startswith("5.1.")


def test_a_recipient_with_specials_is_refused_at_smtp_time(gateway_smtp, protected_domain):
    with gateway_smtp.client() as client:
        client.ehlo()
        client.mail("alice@sender.example")
        for address in ("x,y@example.org", "x>@example.org", 'x"y@example.org'):
            code, reply = client.docmd(f"RCPT TO:<{address}>")
            assert code in (501, 553) and reply[:2] == b"5.", (address, code, reply)
        assert client.rcpt("bob@example.org")[0] == 250
