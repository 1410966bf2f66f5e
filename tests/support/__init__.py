"""What the tests share: servers, services, DNS, mail, people and the browser kit. tests/conftest.py provides
their fixtures to every test; test modules import the rest (`from tests.support.mail import message`)."""
