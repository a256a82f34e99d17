"""The proxy's HTTP rules, sans-IO: RequestReader and ResponseReader fed plain bytes."""

import msgspec
import pytest

from fcrun.proxy.config import ProxyConfig
from fcrun.hostnames import normalize_host
from fcrun.proxy.http import Forwarding, cold_start_headers, error_response
from fcrun.proxy.request import Request, RequestReader
from fcrun.proxy.response import ResponseReader

CLIENT_IP = "192.0.2.7"
TAIL = b"X-Forwarded-For: 192.0.2.7\r\nX-Forwarded-Proto: http\r\nVia: 1.1 fcrun\r\n"


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
                                 + b"X-Forwarded-Host: Example.TEST:8080\r\n\r\n")
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


def test_forwarded_for_and_via_are_appended():
    r, sink = reader()
    r.feed(b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Forwarded-For: 203.0.113.1\r\nX-Forwarded-For: 10.0.0.1\r\n"
           b"Via: 1.1 cdn\r\n\r\n")
    headers = headers_of(sink.heads[0].upstream_head)
    assert (b"X-Forwarded-For", b"203.0.113.1, 10.0.0.1, 192.0.2.7") in headers
    assert (b"Via", b"1.1 cdn, 1.1 fcrun") in headers
    assert [name for name, _ in headers].count(b"X-Forwarded-For") == 1


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
    assert req.upstream_head.endswith(b"Connection: upgrade\r\nUpgrade: websocket\r\nX-Forwarded-Host: a.test\r\n\r\n")
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
])
def test_broken_upstream_responses(raw):
    rr = response_reader()
    rr.feed(raw)
    assert rr.error


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
