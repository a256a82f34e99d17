"""One reading of a Host value (the proxy's and the CMDB's), and the rule for app hostnames."""

from __future__ import annotations

import pytest

from fcrun.errors import SpecError
from fcrun.hostnames import normalize_host, normalize_hostname


@pytest.mark.parametrize("raw, host", [
    ("example.test", "example.test"),
    ("Example.TEST", "example.test"),              # case
    ("example.test.", "example.test"),             # trailing dot
    ("example.test:8080", "example.test"),         # port
    ("Example.Test.:80", "example.test"),          # all three
    ("  example.test ", "example.test"),           # surrounding blanks
    ("10.0.0.1:80", "10.0.0.1"),
    ("under_score.test", "under_score.test"),      # seen in the wild: routed, never an app's name
    ("[::1]", "[::1]"),                            # IPv6: brackets kept, as a URL writes it
    ("[::1]:8080", "[::1]"),
    ("[2001:DB8::1]:443", "[2001:db8::1]"),
    ("[::ffff:10.0.0.1]", "[::ffff:10.0.0.1]"),
    ("", None), (":80", None), (".", None),
    ("a b", None), ("a/b", None), ("a.test:x", None), ("a.test:", None), ("ünï.test", None),
    ("[::1", None), ("[::1]x", None), ("[::1]:x", None), ("[]", None), ("[x::1]", None), ("[a.test]", None),
])
def test_normalize_host(raw, host):
    assert normalize_host(raw) == host
    assert normalize_host(raw.encode("utf-8")) == host  # the proxy passes the header's bytes


@pytest.mark.parametrize("name", ["Example.TEST.", "example.test"])
def test_a_stored_hostname_is_what_its_host_header_asks_for(name):
    stored = normalize_hostname(name)
    for header in (name, f"{name}:8080", name.upper()):
        assert normalize_host(header) == stored


@pytest.mark.parametrize("text", ["", "http://a.test", "a.test:80", "-a.test", "a_b.test", "a" * 64 + ".test",
                                  "[::1]", "::1",
                                  "\u212a.test"])  # KELVIN SIGN: lower() made it "k.test", and it was stored so
def test_normalize_hostname_refuses(text):
    with pytest.raises(SpecError) as info:
        normalize_hostname(text, "--alias")
    assert info.value.where == "--alias"
