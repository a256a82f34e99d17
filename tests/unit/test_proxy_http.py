"""The proxy's HTTP rules, sans-IO: RequestReader and ResponseReader fed plain bytes."""

import re

import msgspec
import pytest

from fcrun.proxy.config import ProxyConfig
from fcrun.hostnames import normalize_host
from fcrun.proxy.http import Forwarding, cold_start_headers, error_response
from fcrun.proxy.request import Request, RequestReader
from fcrun.proxy.response import MAX_RESPONSE_HEAD_BYTES, ResponseReader

CLIENT_IP = "192.0.2.7"
TAIL = b"X-Forwarded-For: 192.0.2.7\r\nX-Real-IP: 192.0.2.7\r\nX-Forwarded-Proto: http\r\nVia: 1.1 fcrun\r\n"


def host_tail(host: bytes) -> bytes:
    return b'Forwarded: for=192.0.2.7;host="%s";proto=http\r\nX-Forwarded-Host: %s\r\n' % (host, host)


class Sink:
    """Records what a RequestReader reports; optionally applies a body limit at the head."""

    def __init__(self, max_body: int | None = None):
        self.max_body = max_body
        self.heads: list[Request] = []
        self.errors: list[tuple[int, str]] = []
        self.upgrades: list[tuple[Request, bytes]] = []

    def request_head(self, req):
        req.max_body = self.max_body
        self.heads.append(req)

    def request_error(self, req, status, message):
        self.errors.append((status, message))

    def request_upgrade(self, req, data):
        self.upgrades.append((req, data))


def reader(config: ProxyConfig | None = None, **sink_args) -> tuple[RequestReader, Sink]:
    sink = Sink(**sink_args)
    return RequestReader(sink, CLIENT_IP, Forwarding(config or ProxyConfig())), sink


def headers_of(head: bytes) -> list[tuple[bytes, bytes]]:
    lines = head.split(b"\r\n")[1:]
    return [tuple(part.strip() for part in line.split(b":", 1)) for line in lines if line]


# Requests ---------------------------------------------------------------------------------------

def test_simple_get_is_rewritten_for_the_upstream():
    r, sink = reader()
    r.feed(b"GET /a?b=1 HTTP/1.1\r\nHost: Example.TEST:8080\r\nAccept: */*\r\n\r\n")
    (req,) = sink.heads
    assert req.method == b"GET" and req.url == b"/a?b=1" and req.host == "example.test"
    assert req.keep_alive and not req.http10 and req.complete
    assert req.upstream_head == (b"GET /a?b=1 HTTP/1.1\r\nHost: Example.TEST:8080\r\nAccept: */*\r\n" + TAIL
                                 + host_tail(b"Example.TEST:8080") + b"\r\n")
    assert not sink.errors


def test_hop_by_hop_headers_are_removed():
    r, sink = reader()
    r.feed(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: keep-alive, X-Secret\r\nKeep-Alive: timeout=5\r\n"
           b"X-Secret: 1\r\nProxy-Authorization: Basic x\r\nProxy-Foo: y\r\nTE: trailers\r\nTrailer: X-T\r\n"
           b"Upgrade: h2c\r\nX-Kept: 2\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\n\r\n")
    (req,) = sink.heads
    names = [name.lower() for name, _ in headers_of(req.upstream_head)]
    for hop in (b"connection", b"keep-alive", b"x-secret", b"proxy-authorization", b"proxy-foo", b"te",
                b"trailer", b"upgrade"):
        assert hop not in names
    assert (b"X-Kept", b"2") in headers_of(req.upstream_head)
    assert (b"X-Forwarded-Proto", b"http") in headers_of(req.upstream_head)
    assert (b"X-Forwarded-Host", b"a.test") in headers_of(req.upstream_head)
    assert names.count(b"x-forwarded-proto") == 1 and names.count(b"x-forwarded-host") == 1
    assert not req.upgrade


FORWARDING_CLAIMS = (b"X-Forwarded-For: 203.0.113.1\r\nx-forwarded-for: 10.0.0.1\r\nX-Forwarded-Proto: https\r\n"
                     b"X-Forwarded-Host: evil.test\r\nFORWARDED: for=198.51.100.9;proto=https\r\n"
                     b"X-Real-IP: 198.51.100.9\r\nVia: 1.1 cdn\r\n")


def test_a_client_s_forwarding_headers_are_replaced_by_what_the_proxy_saw():
    r, sink = reader()
    r.feed(b"GET / HTTP/1.1\r\nHost: a.test\r\n" + FORWARDING_CLAIMS + b"\r\n")
    head = sink.heads[0].upstream_head
    headers = headers_of(head)
    for name, value in ((b"X-Forwarded-For", b"192.0.2.7"), (b"X-Real-IP", b"192.0.2.7"),
                        (b"X-Forwarded-Proto", b"http"), (b"X-Forwarded-Host", b"a.test"),
                        (b"Forwarded", b'for=192.0.2.7;host="a.test";proto=http')):
        assert [v for n, v in headers if n.lower() == name.lower()] == [value]
    for claim in (b"203.0.113.1", b"10.0.0.1", b"https", b"evil.test", b"198.51.100.9"):
        assert claim not in head
    assert (b"Via", b"1.1 cdn, 1.1 fcrun") in headers   # Via is appended: loop detection, not trust


def test_a_trusted_proxy_s_forwarding_headers_are_appended_to_and_kept():
    config = ProxyConfig(trusted_proxies=("192.0.2.0/24", "10.0.0.0/8"))
    r, sink = reader(config)
    r.feed(b"GET / HTTP/1.1\r\nHost: a.test\r\n" + FORWARDING_CLAIMS + b"\r\n")
    headers = headers_of(sink.heads[0].upstream_head)
    assert (b"X-Forwarded-For", b"203.0.113.1, 10.0.0.1, 192.0.2.7") in headers
    assert (b"X-Real-IP", b"203.0.113.1") in headers   # the rightmost address that is no trusted proxy
    assert (b"X-Forwarded-Proto", b"https") in headers and (b"X-Forwarded-Host", b"evil.test") in headers
    assert (b"Forwarded", b'for=198.51.100.9;proto=https, for=192.0.2.7;host="a.test";proto=http') in headers
    assert (b"Via", b"1.1 cdn, 1.1 fcrun") in headers
    names = [name.lower() for name, _ in headers]
    for name in (b"x-forwarded-for", b"x-real-ip", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"):
        assert names.count(name) == 1, name


def test_a_trusted_proxy_that_sends_no_forwarding_headers_gets_the_proxy_s_own():
    r, sink = reader(ProxyConfig(trusted_proxies=("192.0.2.7",)))
    r.feed(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
    assert sink.heads[0].upstream_head == b"GET / HTTP/1.1\r\nHost: a.test\r\n" + TAIL + host_tail(b"a.test") + b"\r\n"


def test_a_peer_outside_the_trusted_networks_is_not_believed():
    r, sink = reader(ProxyConfig(trusted_proxies=("10.0.0.0/8", "2001:db8::/32")))
    r.feed(b"GET / HTTP/1.1\r\nHost: a.test\r\n" + FORWARDING_CLAIMS + b"\r\n")
    assert (b"X-Forwarded-For", b"192.0.2.7") in headers_of(sink.heads[0].upstream_head)


@pytest.mark.parametrize("forwarded_for, real_ip", [
    (b"203.0.113.1, 10.0.0.2", b"203.0.113.1"),
    (b"203.0.113.1, 198.51.100.1, 10.0.0.2", b"198.51.100.1"),   # the leftmost entries are the client's word
    (b"10.0.0.3, 10.0.0.2", b"10.0.0.3"),                        # all trusted: the leftmost
    (b"10.0.0.3,not-an-ip, 10.0.0.2", b"10.0.0.2"),              # garbage stops the walk
    (b"", b"10.0.0.1"),
    (None, b"10.0.0.1"),
])
def test_real_client_ip_reads_x_forwarded_for_as_nginx_realip_does(forwarded_for, real_ip):
    forwarding = Forwarding(ProxyConfig(trusted_proxies=("10.0.0.0/8",)))
    assert forwarding.real_client_ip(forwarded_for, b"10.0.0.1") == real_ip


@pytest.mark.parametrize("peer, trusted", [
    ("10.1.2.3", True), ("::ffff:10.1.2.3", True), ("2001:db8::5", True), ("11.0.0.1", False),
    ("2001:db9::5", False), ("unix", False),
])
def test_trusted_peers(peer, trusted):
    forwarding = Forwarding(ProxyConfig(trusted_proxies=("10.0.0.0/8", "2001:db8::/32")))
    assert forwarding.trusts(peer) is trusted


def test_an_ipv6_client_is_quoted_in_forwarded():
    sink = Sink()
    r = RequestReader(sink, "2001:db8::5", Forwarding(ProxyConfig()))
    r.feed(b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n")
    headers = headers_of(sink.heads[0].upstream_head)
    assert (b"Forwarded", b'for="[2001:db8::5]";host="[::1]:8080";proto=http') in headers
    assert (b"X-Forwarded-For", b"2001:db8::5") in headers


@pytest.mark.parametrize("entries, bad", [
    (["10.0.0.0/8", "10.0.0.1/8"], "trusted_proxies[1]: '10.0.0.1/8'"),   # host bits set
    (["proxy.example"], "trusted_proxies[0]: 'proxy.example'"),
    (["10.0.0.0/33"], "trusted_proxies[0]: '10.0.0.0/33'"),
])
def test_trusted_proxies_must_be_cidrs_and_the_bad_one_is_named(entries, bad):
    with pytest.raises(msgspec.ValidationError, match=re.escape(bad) + ".* is not a CIDR"):
        msgspec.convert({"trusted_proxies": entries}, ProxyConfig)


def test_forwarded_for_and_via_from_an_http10_client():
    r, sink = reader()
    r.feed(b"GET / HTTP/1.0\r\nHost: a.test\r\nX-Forwarded-For: 203.0.113.1\r\n\r\n")
    headers = headers_of(sink.heads[0].upstream_head)
    assert (b"X-Forwarded-For", b"192.0.2.7") in headers and (b"Via", b"1.0 fcrun") in headers


@pytest.mark.parametrize("request_head, keep_alive", [
    (b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", True),
    (b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n", False),
    (b"GET / HTTP/1.0\r\nHost: a.test\r\n\r\n", False),
    (b"GET / HTTP/1.0\r\nHost: a.test\r\nConnection: keep-alive\r\n\r\n", True),
])
def test_keep_alive_by_version_and_connection(request_head, keep_alive):
    r, sink = reader()
    r.feed(request_head)
    (req,) = sink.heads
    assert req.keep_alive is keep_alive
    assert req.upstream_head.startswith(b"GET / HTTP/1.1\r\n")   # always 1.1 upstream
    if req.http10:
        assert (b"Via", b"1.0 fcrun") in headers_of(req.upstream_head)


def test_oversized_head_is_431_whether_complete_or_still_arriving():
    config = ProxyConfig(max_header_bytes=1024)
    r, sink = reader(config)
    r.feed(b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Big: " + b"x" * 2000 + b"\r\n\r\n")
    assert sink.errors and sink.errors[0][0] == 431 and r.stopped and not sink.heads

    r, sink = reader(config)
    r.feed(b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Big: ")
    for _ in range(3):
        if r.stopped:
            break
        r.feed(b"y" * 500)
    assert sink.errors == [(431, "request head over 1024 bytes")]


def test_head_just_under_the_limit_passes():
    config = ProxyConfig(max_header_bytes=1024)
    r, sink = reader(config)
    head = b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Pad: "
    head += b"p" * (1024 - len(head) - 4) + b"\r\n\r\n"
    assert len(head) == 1024
    r.feed(head)
    assert not sink.errors and len(sink.heads) == 1


@pytest.mark.parametrize("request_head, status", [
    (b"GET / HTTP/1.1\r\nHost a.test\r\n\r\n", 400),                 # no colon
    (b"GET / HTTP/1.1\r\n\r\n", 400),                                # no Host
    (b"GET / HTTP/1.1\r\nHost: \r\n\r\n", 400),                      # empty Host, first request (fuzz found)
    (b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a test\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a.test:http\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nHost: a.test\r\nExpect: magic\r\nContent-Length: 1\r\n\r\n", 417),
    (b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test\r\n\r\n", 405),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),          # TLS to a plain port
])
def test_bad_requests(request_head, status):
    r, sink = reader()
    r.feed(request_head)
    assert [e[0] for e in sink.errors] == [status]
    assert r.stopped and not sink.heads


HEAD_START = b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Before: 1\r\n"


@pytest.mark.parametrize("byte", [b"\r", b"\x00", b"\x01", b"\x0b", b"\x0c", b"\x1b", b"\x1f", b"\x7f"])
def test_a_control_byte_in_a_header_value_is_400_naming_the_header(byte):
    r, sink = reader()
    r.feed(HEAD_START + b"X-Evil: a" + byte + b"b\r\nX-After: 2\r\n\r\n")
    assert sink.errors == [(400, f'malformed request: header "X-Evil" holds the control byte '
                                 f'0x{byte[0]:02x} in its value')]
    assert r.stopped and not sink.heads


@pytest.mark.parametrize("name", [b"X-E\x00vil", b"X-E\rvil", b"X-E vil", b"X-E\x7fvil", b"X-E\x80vil",
                                  b"X-E(vil"])
def test_a_bad_byte_in_a_header_name_is_400_naming_the_header(name):
    r, sink = reader()
    r.feed(HEAD_START + name + b": v\r\n\r\n")
    ((status, message),) = sink.errors
    assert status == 400 and message.startswith('malformed request: header name "X-E') and r.stopped
    assert "not allowed in a name" in message


@pytest.mark.parametrize("fold", [b" ", b"\t", b"  \t "])
def test_obs_fold_is_400_naming_the_folded_header(fold):
    r, sink = reader()
    r.feed(HEAD_START + b"X-Folded: a\r\n" + fold + b"b\r\n\r\n")
    assert sink.errors == [(400, 'malformed request: header "X-Folded" continues on a folded line '
                                 '(obs-fold is not accepted)')]
    assert not sink.heads


@pytest.mark.parametrize("request_head, detail", [
    (b"GET / HTTP/1.1\nHost: a.test\r\n\r\n", "the request line ends with a bare LF"),
    (HEAD_START + b"X-Bare: 1\nX-Next: 2\r\n\r\n", 'header "X-Bare" ends with a bare LF'),
    (HEAD_START + b"\n", "the head ends with a bare LF"),
    (b"GET / HTTP/1.1\nHost: a.test\n\n", "the request line ends with a bare LF"),
])
def test_a_bare_lf_line_end_is_400(request_head, detail):
    """RFC 9112 2.2 lets a recipient accept a bare LF; fcrun refuses it, so that no server
    behind it can split the head at a place the proxy did not."""
    r, sink = reader()
    r.feed(request_head)
    ((status, message),) = sink.errors
    assert status == 400 and detail in message and not sink.heads


def test_the_header_at_fault_is_named_when_the_head_came_in_several_reads():
    r, sink = reader()
    for part in (b"GET / HTTP/1.1\r\nHo", b"st: a.test\r\nX-Sp", b"lit: a\x00", b"b\r\n\r\n"):
        if not r.stopped:
            r.feed(part)
    assert sink.errors == [(400, 'malformed request: header "X-Split" holds the control byte 0x00 in its value')]


def test_a_bad_header_after_a_pipelined_request_is_still_400():
    r, sink = reader()
    r.feed(b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 11\r\n\r\nX-Evil: \x00\r\n"
           b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Evil: a\rb\r\n\r\n")
    assert len(sink.heads) == 1 and sink.heads[0].complete
    ((status, message),) = sink.errors
    # The second head began inside the read, where llhttp does not say: the reason is llhttp's
    # (naming a header from the first request's body would be wrong).
    assert status == 400 and message.startswith("malformed request: ") and "X-Evil" not in message


@pytest.mark.parametrize("value", [b"a\tb", b"caf\xc3\xa9", b"\x80\xff", b"  padded"])
def test_tab_and_obs_text_in_values_are_forwarded_as_parsed(value):
    r, sink = reader()
    r.feed(HEAD_START + b"X-Text: " + value + b"\r\n\r\n")
    assert (b"X-Text: " + value.lstrip() + b"\r\n") in sink.heads[0].upstream_head


@pytest.mark.parametrize("request_head, status", [
    (b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
    (b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3, 3\r\n\r\nabc", 400),
    (b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: +3\r\n\r\nabc", 400),
    (b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 0x3\r\n\r\nabc", 400),
    (b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 1" + b"0" * 20 + b"\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400),   # chunked not last
    (b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: identity\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: \r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding : chunked\r\n\r\n", 400),   # space before colon
    (b"POST / HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: x\r\nContent-Length: 3\r\n\r\nabc", 400),
    (b"POST / HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\n", 400),
])
def test_heads_that_could_be_framed_two_ways_are_refused(request_head, status):
    r, sink = reader()
    r.feed(request_head)
    assert [e[0] for e in sink.errors] == [status]
    assert r.stopped and not sink.heads and not sink.upgrades


CHUNKED_HEAD = b"POST /p HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize("body, reason", [
    (b"1" + b"0" * 16 + b"\r\n", "Chunk size overflow"),
    (b"-1\r\nx\r\n", "Invalid character in chunk size"),
    (b"0x1\r\nx\r\n", "Invalid character in chunk size"),
    (b"1 \r\nx\r\n", "Invalid character in chunk size"),
    (b"1\nx\r\n0\r\n\r\n", "Missing expected CR after chunk size"),
    (b"1;a\x01\r\nx\r\n", "Invalid character in chunk extensions"),
    (b"1;a\nx\r\n", "Missing expected CR after chunk extension"),
    (b"1\r\nxy0\r\n\r\n", "Expected LF after chunk data"),
    (b"1\r\nx\r\n0\r\nContent-Length: 5\r\n\r\n", "Content-Length can't be present with Transfer-Encoding"),
    (b"1\r\nx\r\n0\r\nX-T: a\x00\r\n\r\n", "Invalid header value char"),
])
def test_bad_chunked_framing_is_400_after_what_was_forwarded(body, reason):
    r, sink = reader()
    r.feed(CHUNKED_HEAD + body)
    ((status, message),) = sink.errors
    assert status == 400 and reason in message and r.stopped
    (req,) = sink.heads
    assert not req.complete   # the driver cuts the upstream: the request never looks finished there
    assert b"0\r\n\r\n" not in b"".join(req.pending)


def test_chunk_extensions_and_trailers_are_dropped_and_the_body_rechunked():
    r, sink = reader()
    r.feed(CHUNKED_HEAD + b"3;name=value;q=\"a;b\"\r\nabc\r\n00A\r\n0123456789\r\n0;last\r\nX-Trailer: 1\r\n"
           b"Content-Type: evil\r\n\r\n")
    (req,) = sink.heads
    assert req.complete and not sink.errors
    assert b"".join(req.pending) == b"3\r\nabc\r\na\r\n0123456789\r\n0\r\n\r\n"


def test_the_upstream_head_is_rebuilt_from_the_parsed_fields_not_copied():
    """Leading empty lines, whitespace around a value, the version, the target's form: the
    upstream gets one spelling of each, the one the proxy parsed."""
    r, sink = reader()
    r.feed(b"\r\nPUT http://a.test/x HTTP/1.0\r\nHost:a.test\r\nX-A:\t  b c  \r\nConnection: keep-alive\r\n"
           b"Content-Length:  2\r\n\r\nok")
    (req,) = sink.heads
    assert req.upstream_head == (b"PUT /x HTTP/1.1\r\nX-A: b c  \r\nContent-Length: 2\r\nHost: a.test\r\n"
                                 b"X-Forwarded-For: 192.0.2.7\r\nX-Real-IP: 192.0.2.7\r\nX-Forwarded-Proto: http\r\n"
                                 b"Via: 1.0 fcrun\r\n" + host_tail(b"a.test") + b"\r\n")
    assert req.pending == [b"ok"]


def test_content_length_body_is_passed_through():
    r, sink = reader()
    r.feed(b"POST /p HTTP/1.1\r\nHost: a.test\r\nContent-Length: 10\r\n\r\n01234")
    (req,) = sink.heads
    assert (b"Content-Length", b"10") in headers_of(req.upstream_head)
    assert req.pending == [b"01234"] and not req.complete
    req.pending.clear()
    r.feed(b"56789")
    assert req.pending == [b"56789"] and req.complete and req.body_bytes == 10


def test_chunked_body_is_rechunked_and_trailers_dropped():
    r, sink = reader()
    r.feed(b"POST /p HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
           b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nX-Sum: 5\r\n\r\n")
    (req,) = sink.heads
    assert req.chunked and req.complete
    headers = headers_of(req.upstream_head)
    assert (b"Transfer-Encoding", b"chunked") in headers and (b"Trailer", b"X-Sum") not in headers
    assert b"".join(req.pending) == b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"


def test_chunked_body_over_the_limit_is_413_when_it_crosses():
    r, sink = reader(max_body=5)
    r.feed(b"POST /p HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    assert not sink.errors
    r.feed(b"3\r\ndef\r\n")
    assert sink.errors == [(413, "request body over 5 bytes")] and r.stopped


@pytest.mark.parametrize("connection, named", [
    (b"content-length", "content-length"),
    (b"Keep-Alive, Content-Length", "content-length"),
    (b"host", "host"),
    (b"close, transfer-encoding, x-hop", "transfer-encoding"),
    (b"HOST, content-length", "content-length, host"),
])
def test_a_connection_header_may_not_make_framing_or_routing_headers_hop_by_hop(connection, named):
    # Dropping Content-Length while llhttp framed the body by it would hand the upstream the
    # body as a second request of the client's making (request smuggling).
    smuggled = b"GET /admin HTTP/1.1\r\nHost: a.test\r\n\r\n"
    r, sink = reader()
    r.feed(b"POST /x HTTP/1.1\r\nHost: a.test\r\nConnection: %s\r\nContent-Length: %d\r\n\r\n%s"
           % (connection, len(smuggled), smuggled))
    assert sink.errors == [(400, f"the Connection header lists {named}: a header that frames or routes "
                                 f"the request cannot be hop-by-hop")]
    assert r.stopped and not sink.heads


def test_connection_options_and_other_names_still_pass():
    r, sink = reader()
    r.feed(b"POST /x HTTP/1.1\r\nHost: a.test\r\nConnection: keep-alive, TE, x-hop\r\nX-Hop: 1\r\nTE: trailers\r\n"
           b"Content-Length: 2\r\n\r\nok")
    (req,) = sink.heads
    assert not sink.errors and req.complete and req.pending == [b"ok"]
    assert headers_of(req.upstream_head)[:2] == [(b"Host", b"a.test"), (b"Content-Length", b"2")]
    assert b"x-hop" not in req.upstream_head.lower()


TRAILER_LIMIT = ProxyConfig(max_header_bytes=1024)


def test_an_endless_request_trailer_is_431_once_over_max_header_bytes():
    r, sink = reader(TRAILER_LIMIT)
    r.feed(CHUNKED_HEAD + b"5\r\nhello\r\n0\r\nX-T: ")
    for _ in range(4):   # no read is refused until the trailer's reads pass the limit
        r.feed(b"a" * 256)
    assert not sink.errors
    r.feed(b"a")
    assert sink.errors == [(431, "request trailer section over 1024 bytes")] and r.stopped
    assert not sink.heads[0].complete


def test_a_trailer_in_several_reads_and_chunks_in_many_reads_are_not_refused():
    r, sink = reader(TRAILER_LIMIT)
    r.feed(CHUNKED_HEAD)
    for _ in range(50):   # each read ends after a chunk-size line: its data comes with the next
        r.feed(b"100\r\n")
        r.feed(b"x" * 256 + b"\r\n")
    r.feed(b"0\r\n")
    r.feed(b"X-T: " + b"a" * 500 + b"\r\n")
    r.feed(b"X-U: " + b"b" * 500 + b"\r\n\r\nGET /next HTTP/1.1\r\nHost: a.test\r\n\r\n")
    assert not sink.errors
    first, second = sink.heads
    assert first.complete and first.body_bytes == 50 * 256 and second.url == b"/next"


def test_expect_continue_is_noted_and_not_forwarded():
    r, sink = reader()
    r.feed(b"PUT /f HTTP/1.1\r\nHost: a.test\r\nExpect: 100-Continue\r\nContent-Length: 3\r\n\r\n")
    (req,) = sink.heads
    assert req.expect_continue
    assert b"expect" not in req.upstream_head.lower()


def test_pipelined_requests_come_out_in_order():
    r, sink = reader()
    r.feed(b"GET /1 HTTP/1.1\r\nHost: a.test\r\n\r\nPOST /2 HTTP/1.1\r\nHost: a.test\r\nContent-Length: 2\r\n\r\nokGET /3 HT")
    assert [req.url for req in sink.heads] == [b"/1", b"/2"]
    assert sink.heads[1].pending == [b"ok"] and r.in_message
    r.feed(b"TP/1.1\r\nHost: b.test\r\n\r\n")
    assert [req.host for req in sink.heads] == ["a.test", "a.test", "b.test"]


def test_upgrade_request_hands_over_the_early_bytes():
    r, sink = reader()
    r.feed(b"GET /ws HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nEARLY")
    (req,) = sink.heads
    assert req.upgrade and not req.keep_alive
    assert req.upstream_head.endswith(host_tail(b"a.test") + b"Connection: upgrade\r\nUpgrade: websocket\r\n\r\n")
    assert sink.upgrades == [(req, b"EARLY")] and r.stopped


def test_absolute_form_target_takes_the_host_from_the_url():
    r, sink = reader()
    r.feed(b"GET http://B.test:81/x?y HTTP/1.1\r\nHost: ignored.test\r\n\r\n")
    (req,) = sink.heads
    assert req.url == b"/x?y" and req.host == "b.test"
    assert req.upstream_head.startswith(b"GET /x?y HTTP/1.1\r\n")
    assert (b"Host", b"B.test:81") in headers_of(req.upstream_head)
    assert b"ignored.test" not in req.upstream_head


@pytest.mark.parametrize("raw, host", [
    (b"Example.Test", "example.test"), (b"[::1]:8080", "[::1]"), (b"a b", None),
])
def test_the_request_host_is_the_one_normalize_host_gives(raw, host):
    r, sink = reader()
    r.feed(b"GET / HTTP/1.1\r\nHost: " + raw + b"\r\n\r\n")
    if host is None:
        assert not sink.heads and sink.errors == [(400, "invalid Host header")]  # the rule: test_hostnames.py
    else:
        assert sink.heads[0].host == host == normalize_host(raw)


# Responses --------------------------------------------------------------------------------------

def response_reader(method: bytes = b"GET", http10: bool = False, keep_alive: bool = True, upgrade: bool = False,
                    extra: bytes = b"") -> ResponseReader:
    rr = ResponseReader(Forwarding(ProxyConfig()))
    rr.begin(request(method, http10, upgrade), keep_alive, extra)
    return rr


def request(method: bytes = b"GET", http10: bool = False, upgrade: bool = False) -> Request:
    req = Request()
    req.method, req.http10, req.upgrade = method, http10, upgrade
    return req


def out(rr: ResponseReader) -> bytes:
    data = b"".join(rr.out)
    rr.out.clear()
    return data


def test_response_hop_by_hop_removed_and_via_added():
    rr = response_reader()
    rr.feed(b"HTTP/1.1 200 OK\r\nServer: x\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n"
            b"Content-Length: 2\r\nProxy-Authenticate: Basic\r\nX-A: 1\r\n\r\nhi")
    assert out(rr) == b"HTTP/1.1 200 OK\r\nServer: x\r\nContent-Length: 2\r\nX-A: 1\r\nVia: 1.1 fcrun\r\n\r\nhi"
    assert rr.complete and rr.reusable and rr.status == 200 and not rr.close_client


def test_response_hop_by_hop_lines_are_found_by_whole_name_only():
    # The head is searched for the names (no per-header callback): a name that only starts or
    # ends like a hop-by-hop one, or a value that holds one, stays; each of several lines goes.
    rr = response_reader()
    rr.feed(b"HTTP/1.1 200 OK\r\nX-Via: a\r\nVia-Note: b\r\nX-C: connection: close\r\nTE: trailers\r\n"
            b"Content-Length: 2\r\nPROXY-Status: x\r\nUpgrade-Insecure: 1\r\nKeep-Alive: 1\r\nkeep-alive: 2\r\n"
            b"Trailer: X-T\r\nVia: 1.0 a\r\nvia: 1.0 b\r\n\r\nhi")
    assert out(rr) == (b"HTTP/1.1 200 OK\r\nX-Via: a\r\nVia-Note: b\r\nX-C: connection: close\r\n"
                       b"Content-Length: 2\r\nUpgrade-Insecure: 1\r\nVia: 1.0 a, 1.0 b, 1.1 fcrun\r\n\r\nhi")
    assert rr.complete and rr.reusable and not rr.close_client


def test_a_chunked_response_s_trailer_fields_do_not_reach_the_next_head():
    rr = response_reader()
    rr.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\nVia: t\r\nX-T: 1\r\n\r\n")
    assert rr.complete and rr.reusable
    out(rr)
    rr.begin(request(), True)
    rr.feed(b"HTTP/1.1 200 OK\r\nX-T: 2\r\nContent-Length: 0\r\n\r\n")
    assert out(rr) == b"HTTP/1.1 200 OK\r\nX-T: 2\r\nContent-Length: 0\r\nVia: 1.1 fcrun\r\n\r\n"


def test_response_connection_tokens_and_odd_spacing():
    rr = response_reader()
    rr.feed(b"HTTP/1.1 200 OK\r\nX-Hop: 1\r\nConnection:  x-hop,  keep-alive\r\nContent-Length: 0\r\n"
            b"Via: 1.0 app\r\n\r\n")
    assert out(rr) == b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nVia: 1.0 app, 1.1 fcrun\r\n\r\n"


def test_response_connection_close_makes_upstream_not_reusable():
    rr = response_reader()
    rr.feed(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx")
    assert rr.complete and not rr.reusable and not rr.close_client
    assert b"Connection" not in out(rr)


def test_chunked_response_rechunked_for_http11_and_raw_with_close_for_http10():
    body = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\n\r\n4\r\nwiki\r\n0\r\nX-T: 1\r\n\r\n"
    rr = response_reader()
    rr.feed(body)
    assert out(rr) == b"HTTP/1.1 200 OK\r\nVia: 1.1 fcrun\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwiki\r\n0\r\n\r\n"
    assert rr.complete and rr.reusable

    rr = response_reader(http10=True)
    rr.feed(body)
    assert out(rr) == b"HTTP/1.1 200 OK\r\nVia: 1.1 fcrun\r\nConnection: close\r\n\r\nwiki"
    assert rr.complete and rr.close_client


def test_http10_client_with_keep_alive_gets_it_stated():
    rr = response_reader(http10=True)
    rr.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")
    assert out(rr) == b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nVia: 1.1 fcrun\r\nConnection: keep-alive\r\n\r\nx"


def test_head_response_has_no_body_and_the_parser_recovers():
    rr = response_reader(method=b"HEAD")
    rr.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
    assert out(rr) == b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nVia: 1.1 fcrun\r\n\r\n"
    assert rr.complete and rr.reusable
    rr.begin(request(), True)
    rr.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert out(rr).endswith(b"\r\n\r\nok") and rr.complete


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_statuses(status):
    rr = response_reader()
    rr.feed(b"HTTP/1.1 %d X\r\nETag: 1\r\n\r\n" % status)
    assert out(rr) == b"HTTP/1.1 %d X\r\nETag: 1\r\nVia: 1.1 fcrun\r\n\r\n" % status
    assert rr.complete and rr.reusable


def test_close_delimited_response_is_rechunked_and_ends_at_eof():
    rr = response_reader()
    rr.feed(b"HTTP/1.0 200 OK\r\nServer: old\r\n\r\nabc")
    assert out(rr) == b"HTTP/1.1 200 OK\r\nServer: old\r\nVia: 1.1 fcrun\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
    assert not rr.complete
    assert rr.feed_eof()
    assert out(rr) == b"0\r\n\r\n" and rr.complete and not rr.reusable


def test_interim_responses_are_dropped():
    rr = response_reader()
    rr.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
            b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    assert out(rr) == b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\nVia: 1.1 fcrun\r\n\r\n"
    assert rr.complete and rr.status == 201


@pytest.mark.parametrize("status", [b"099", b"000", b"050"])
def test_a_status_under_100_is_an_error_not_an_interim_response(status):
    # Taken for an interim response, its head was dropped and its body passed on raw: a forged
    # response in the client's connection.
    forged = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"
    rr = response_reader()
    rr.feed(b"HTTP/1.1 %s X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(forged), forged)
            + b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nreal")
    assert rr.error == f"upstream sent status {status.decode()} (a status is 100 to 599)"
    assert not rr.head_sent and out(rr) == b""


@pytest.mark.parametrize("status", [104, 150, 199])
def test_an_interim_response_with_a_body_is_an_error(status):
    # llhttp frames a body for 104-199 by Content-Length; RFC 9112 6.3 says they have none.
    rr = response_reader()
    rr.feed(b"HTTP/1.1 %d X\r\nContent-Length: 6\r\n\r\nforged" % status)
    assert rr.error == "upstream sent a body with an interim (1xx) response" and out(rr) == b""


@pytest.mark.parametrize("connection", [b"content-length", b"keep-alive, Content-Length"])
def test_a_response_whose_connection_header_names_content_length_is_an_error(connection):
    # Its body is framed by Content-Length: dropping the line would leave the client unable to
    # find the end of the body on a connection kept alive.
    rr = response_reader()
    rr.feed(b"HTTP/1.1 200 OK\r\nConnection: %s\r\nContent-Length: 5\r\n\r\nhello" % connection)
    assert rr.error == ("upstream's Connection header lists content-length: a header that frames the "
                        "response cannot be hop-by-hop")
    assert not rr.head_sent and out(rr) == b""


def test_an_endless_response_head_is_an_error_before_anything_is_sent():
    rr = response_reader()
    rr.feed(b"HTTP/1.1 200 OK\r\nX-Big: ")
    while rr.error is None and len(rr._raw) < 2 * MAX_RESPONSE_HEAD_BYTES:
        rr.feed(b"a" * 4096)
    assert rr.error == f"upstream's response head over {MAX_RESPONSE_HEAD_BYTES} bytes"
    assert not rr.head_sent and out(rr) == b""


def test_a_response_head_over_the_limit_in_one_read_is_an_error():
    rr = response_reader()
    rr.feed(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * MAX_RESPONSE_HEAD_BYTES + b"\r\nContent-Length: 0\r\n\r\n")
    assert rr.error == f"upstream's response head over {MAX_RESPONSE_HEAD_BYTES} bytes" and not rr.head_sent


@pytest.mark.parametrize("per_read", [1, 100])
def test_endless_interim_responses_are_an_error(per_read):
    rr = response_reader()
    interim = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
    for _ in range(2 * MAX_RESPONSE_HEAD_BYTES // len(interim) // per_read):
        rr.feed(interim * per_read)
        if rr.error:
            break
    assert rr.error == f"upstream's response head over {MAX_RESPONSE_HEAD_BYTES} bytes"
    assert len(rr._raw) <= MAX_RESPONSE_HEAD_BYTES + len(interim) * per_read   # earlier ones let go


def test_a_head_and_interim_responses_in_many_small_reads_pass():
    rr = response_reader()
    raw = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nServer: x\r\nConnection: x-hop\r\nX-Hop: 1\r\n"
           b"Content-Length: 5\r\n\r\nhello")
    for i in range(len(raw)):
        rr.feed(raw[i:i + 1])
    assert out(rr) == b"HTTP/1.1 200 OK\r\nServer: x\r\nContent-Length: 5\r\nVia: 1.1 fcrun\r\n\r\nhello"
    assert rr.complete and not rr.error


def test_an_endless_response_trailer_is_an_error_after_the_head():
    rr = response_reader()
    rr.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: ")
    assert out(rr) == b"HTTP/1.1 200 OK\r\nVia: 1.1 fcrun\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    for _ in range(MAX_RESPONSE_HEAD_BYTES // 4096):
        rr.feed(b"a" * 4096)
    assert rr.error is None
    rr.feed(b"a")
    assert rr.error == f"upstream's trailer section over {MAX_RESPONSE_HEAD_BYTES} bytes" and not rr.complete


def test_a_chunked_response_in_many_reads_is_no_trailer():
    rr = response_reader()
    rr.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(100):   # each read ends after a chunk-size line: its data comes with the next
        rr.feed(b"1000\r\n")
        rr.feed(b"x" * 4096 + b"\r\n")
    rr.feed(b"0\r\nX-T: 1\r\n\r\n")
    assert rr.error is None and rr.complete and rr.body_bytes == 100 * 4096


def test_switching_protocols_keeps_upgrade_headers():
    rr = response_reader(upgrade=True, keep_alive=False)
    rr.feed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: x\r\n\r\nSERVER-FIRST")
    assert out(rr) == (b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: x\r\nVia: 1.1 fcrun\r\n"
                       b"Connection: upgrade\r\nUpgrade: websocket\r\n\r\n")
    assert rr.upgraded and rr.tunnel_data == b"SERVER-FIRST" and not rr.reusable


def test_switching_protocols_without_an_upgrade_request_is_an_error():
    rr = response_reader()
    rr.feed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    assert rr.error and not rr.head_sent


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhiEXTRA",     # more than one response
    b"garbage\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    # What llhttp refuses in a response head, as in a request's:
    b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-A: a\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    # and what it lets through in the status line, which the proxy forwards raw:
    b"HTTP/1.1 200 O\x00K\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 O\x1bK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.0 404 \x7f\r\nContent-Length: 0\r\n\r\n",
])
def test_broken_upstream_responses(raw):
    rr = response_reader()
    rr.feed(raw)
    assert rr.error


@pytest.mark.parametrize("status_line", [b"HTTP/1.1 200 OK", b"HTTP/1.1 404 Not\tFound \xff", b"HTTP/1.1 204 ",
                                         b"HTTP/1.1 200"])
def test_status_lines_without_control_bytes_pass(status_line):
    rr = response_reader()
    rr.feed(status_line + b"\r\nContent-Length: 0\r\n\r\n")
    assert not rr.error and out(rr).startswith(status_line + b"\r\n")


def test_cold_start_headers_go_into_the_head():
    rr = response_reader(extra=cold_start_headers(("start", 123.44)))
    rr.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert out(rr) == (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nVia: 1.1 fcrun\r\n"
                       b"X-Fcrun-Cold-Start: 123.4\r\nX-Fcrun-Cold-Start-Path: start\r\n\r\n")


def test_response_head_split_across_reads():
    rr = response_reader()
    rr.feed(b"HTTP/1.1 200 OK\r\nConnection: keep")
    assert not rr.out
    rr.feed(b"-alive\r\nContent-Length: 3\r\n\r\nab")
    rr.feed(b"c")
    assert out(rr) == b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nVia: 1.1 fcrun\r\n\r\nabc"
    assert rr.complete


def test_error_response_shape():
    assert error_response(404, "no app serves host 'x.test'", close=False) == (
        b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 43\r\n\r\n"
        b"404 Not Found: no app serves host 'x.test'\n")
    head_only = error_response(502, "down", close=True, head_only=True)
    assert head_only.endswith(b"Connection: close\r\n\r\n")


def test_config_decodes_with_defaults_and_rejects_unknown_keys():
    assert msgspec.convert({}, ProxyConfig) == ProxyConfig()
    assert msgspec.convert({"max_body_bytes": 1024}, ProxyConfig).max_body_bytes == 1024
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.convert({"max_headers": 1}, ProxyConfig)
