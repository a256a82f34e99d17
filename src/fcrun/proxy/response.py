"""The response side of the proxy's HTTP/1.1 (sans-IO): upstream bytes in, bytes for the client out.

See http.py for the rules both sides follow.
"""

from __future__ import annotations

import httptools
from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade

from .http import (CRLF, HEAD, HEADER_CONNECTION, HEADER_DROP, HEADER_TRANSFER_ENCODING, HEADER_UPGRADE,
                   HEADER_VIA, HOP_BY_HOP_HEADERS, Forwarding, ProtocolViolation, connection_tokens,
                   named_end_to_end_headers)
from .request import Request

# What to do with a response header, by lowercase name (kinds in http.py). Absent: forwarded unchanged.
# Content-Length is not here: llhttp's keep-alive verdict implies it (see on_headers_complete).
_RESPONSE_HEADERS = HOP_BY_HOP_HEADERS
_RESPONSE_SPECIAL_LENGTHS = frozenset(len(name) for name in _RESPONSE_HEADERS)
# Control bytes a reason phrase may not hold (RFC 9112 4: HTAB, SP, VCHAR, obs-text only).
# llhttp lets them through there (not in header lines), and the status line is forwarded raw.
_REASON_CONTROL_BYTES = bytes(range(0x09)) + bytes(range(0x0A, 0x20)) + b"\x7f"

# The most an app may send before its response head is complete (that head with the interim 1xx
# responses before it), and in a chunked response's trailer section. llhttp buffers a header
# field until its end, and the head is held here until it is whole, so without a bound an app
# would make the proxy hold what it likes. nginx's bound (proxy_buffer_size) is 4 or 8 KiB, and
# answers 502 "upstream sent too big header"; this one leaves room for large cookies and CSPs.
MAX_RESPONSE_HEAD_BYTES = 64 * 1024

# Response body framing towards the client.
_BODY_NONE = 0        # HEAD, 204, 304, 101
_BODY_RAW = 1         # Content-Length, or close-delimited for an HTTP/1.0 client
_BODY_CHUNKED = 2     # re-chunked: the upstream sent chunked or close-delimited


class ResponseReader:
    """Upstream bytes in, client bytes out (sans-IO), one response per ``begin()``.

    After each ``feed()``: ``out`` holds bytes for the client (the driver writes and clears
    it); ``complete`` says the response ended (``reusable``: the upstream connection may serve
    another request); ``upgraded`` says a 101 arrived and ``tunnel_data`` are the first tunnel
    bytes; ``error`` names why the upstream's bytes cannot be used.

    llhttp validates the head and frames the body. The head itself is forwarded from its raw
    bytes (a response always starts a read: nothing is pipelined towards an upstream), with
    the hop-by-hop lines cut out where the per-header callback spotted them: responses carry
    many headers and rarely a hop-by-hop one besides Connection, so the callback only classifies.
    """

    __slots__ = ("_parser", "_forwarding", "_req", "_raw", "_head_start", "_held_bytes", "_special", "_mode",
                 "_keep_alive", "_extra", "_interim", "_until_eof", "_upstream_keep_alive", "_last_chunk_at",
                 "_reset_parser", "out", "status", "head_bytes", "body_bytes", "head_sent",
                 "complete", "reusable", "close_client", "upgraded", "tunnel_data", "error")

    def __init__(self, forwarding: Forwarding):
        self._parser = httptools.HttpResponseParser(self)
        self._forwarding = forwarding
        self._reset_parser = False
        self._req: Request | None = None
        self._keep_alive = True
        self._extra = b""
        self._raw = b""             # the head's bytes as received (it may span reads)
        self._head_start = 0        # where in _raw the head begins (after interim responses)
        # Bytes counted against MAX_RESPONSE_HEAD_BYTES outside _raw: interim responses no longer
        # held, then (once the head is out) the reads that went into the trailer section.
        self._held_bytes = 0
        self._last_chunk_at = -1    # body_bytes at the latest chunk-size line (chunked only)
        self._special: list[tuple[int, bytes, bytes]] | None = None
        self._mode = _BODY_NONE
        self._interim = False
        self._until_eof = False
        self._upstream_keep_alive = False
        self.out: list[bytes] = []
        self.status = 0
        self.head_bytes = 0
        self.body_bytes = 0
        self.head_sent = False
        self.complete = True
        self.reusable = False
        self.close_client = False
        self.upgraded = False
        self.tunnel_data = b""
        self.error: str | None = None

    def begin(self, req: Request, keep_alive: bool, extra_headers: bytes = b"") -> None:
        """Expect the response to ``req``; ``extra_headers`` (complete lines) go into its head.

        Only what a finished response leaves behind is reset here; the rest is set when the
        head arrives. (A reader whose response failed or upgraded is never used again.)
        """
        if self._reset_parser:
            # llhttp cannot be told that a response answers HEAD, so after one it still waits
            # for the body its Content-Length announced: start over with a fresh parser.
            self._parser = httptools.HttpResponseParser(self)
            self._reset_parser = False
        self._req = req
        self._keep_alive = keep_alive
        self._extra = extra_headers
        self.head_sent = False
        self.complete = False

    def refuse_keep_alive(self) -> None:
        """Say Connection: close in the head, if it is not out yet (the server is closing)."""
        self._keep_alive = False

    def feed(self, data: bytes) -> None:
        in_trailer = False
        if not self.head_sent:
            if self._raw:
                self._hold_more(data)
            else:
                self._raw = data   # the common case: a head in one read, held without a copy
        elif self._last_chunk_at == self.body_bytes:
            # No body byte since the latest chunk-size line: this read holds that chunk's data,
            # or, if it was the last chunk (size 0), the trailer section. Told apart below.
            in_trailer = True
            body_before = self.body_bytes
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade as upgrade:
            self.tunnel_data = data[upgrade.args[0]:]
        except HttpParserCallbackError as err:
            if not isinstance(err.__context__, ProtocolViolation):
                raise (err.__context__ or err) from None
        except HttpParserError as err:
            self.error = f"malformed response from upstream: {err}"
            self._reset_parser = True
        if self.head_sent:
            if in_trailer and self.body_bytes == body_before and not self.complete and self.error is None:
                # (Not the trailer's first read, which also held the last chunk: the bound is
                # MAX_RESPONSE_HEAD_BYTES plus one read.)
                self._held_bytes += len(data)
                if self._held_bytes > MAX_RESPONSE_HEAD_BYTES:
                    self._over_limit("trailer section")
        elif self.error is None and self._held_bytes + len(self._raw) > MAX_RESPONSE_HEAD_BYTES:
            self._over_limit("response head")   # all of _raw is head, or interim responses

    def _hold_more(self, data: bytes) -> None:
        """Add a read to the head bytes held: the head spans reads, or interim responses came first."""
        raw = self._raw
        start = self._head_start
        if start:
            # The interim responses before start are done with: only their size still counts.
            self._held_bytes += start
            self._head_start = 0
            raw = raw[start:]
            if not raw:
                self._raw = data
                return
        if type(raw) is bytes:
            raw = bytearray(raw)   # appended to in place from now on: no copy of all of it per read
        raw += data
        self._raw = raw

    def _over_limit(self, what: str) -> None:
        self.error = f"upstream's {what} over {MAX_RESPONSE_HEAD_BYTES} bytes"
        self._reset_parser = True

    def feed_eof(self) -> bool:
        """The upstream closed its side; True if that ended a close-delimited response."""
        if not self._until_eof or self.complete or not self.head_sent:
            return False
        if self._mode == _BODY_CHUNKED:
            self.out.append(b"0\r\n\r\n")
        self.complete = True
        self.reusable = False
        return True

    def _violation(self, message: str) -> None:
        self.error = message
        self._reset_parser = True
        raise ProtocolViolation(message)

    # httptools callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            # Bytes after the end of the response: the connection is out of step.
            self._violation("upstream sent more than one response")

    def on_header(self, name: bytes, value: bytes) -> None:
        # Most headers are none of ours: a length no special name has, not starting with p/P
        # (Proxy-*), settles that without lowercasing. (llhttp rejects empty names.)
        if len(name) not in _RESPONSE_SPECIAL_LENGTHS and name[0] | 0x20 != 0x70:
            return
        lname = name.lower()
        kind = _RESPONSE_HEADERS.get(lname)
        if kind is None:
            if not lname.startswith(b"proxy-"):
                return
            kind = HEADER_DROP
        if self.head_sent:
            return   # a chunked body's trailer field: dropped (it must not reach the next head)
        if self._special is None:
            self._special = []
        self._special.append((kind, name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        raw = self._raw
        start = self._head_start
        end = raw.find(b"\r\n\r\n", start) + 4
        if self._held_bytes + end > MAX_RESPONSE_HEAD_BYTES:
            self._violation(f"upstream's response head over {MAX_RESPONSE_HEAD_BYTES} bytes")
        status = parser.get_status_code()
        if status < 200 and status != 101:
            if status < 100:
                # llhttp takes any three digits; a status under 100 is no interim response
                # (one would drop its head but frame a body after it: bytes outside any response).
                self._violation(f"upstream sent status {status:03d} (a status is 100 to 599)")
            self._interim = True   # 100 Continue, 103 Early Hints: not passed on
            self._head_start = end
            self._special = None
            return
        # (raw is a bytearray when the head came in several reads: see _hold_more.)
        self._raw = b""
        self._head_start = 0
        self._held_bytes = 0
        self.status = status
        self.body_bytes = 0
        self._upstream_keep_alive = upstream_keep_alive = parser.should_keep_alive()
        req = self._req
        http10 = req.http10
        te = upgrade = via = None
        # The head goes out as slices of raw: the status line (as HTTP/1.1) and the header
        # lines between the ones to cut, without the blank line.
        line_end = raw.find(b"\r\n", start)
        reason = raw[start + 13:line_end]   # after "HTTP/1.x 200 "
        if len(reason.translate(None, _REASON_CONTROL_BYTES)) != len(reason):
            self._violation("upstream sent a control byte in its status line")
        if raw[start:start + 9] == b"HTTP/1.1 ":
            parts = []
            position = start
        else:
            parts = [b"HTTP/1.1"]
            position = start + 8
        special = self._special
        if special is not None:
            self._special = None
            tokens = None
            for kind, name, value in special:
                if kind == HEADER_CONNECTION:
                    tokens = connection_tokens(value, tokens)
                elif kind == HEADER_TRANSFER_ENCODING:
                    value = value.strip().lower()
                    te = value if te is None else te + b"," + value
                elif kind == HEADER_UPGRADE:
                    upgrade = value
                elif kind == HEADER_VIA:
                    via = value if via is None else via + b", " + value
                # Cut the line. It mostly reads "Name: value": one search finds it exactly.
                # position is a line start (or the head's), so the newline before the next
                # line to cut is at or after position - 1.
                line = b"".join((b"\n", name, b": ", value, b"\r\n"))
                found = raw.find(line, position - 1 if position else 0, end)
                if found >= 0:
                    stop = found + len(line)
                else:
                    found = raw.find(b"\n" + name + b":", position - 1 if position else 0, end)
                    if found < 0:
                        continue   # a trailer field, reported after the head
                    stop = raw.find(b"\n", found + 1) + 1
                parts.append(raw[position:found + 1])
                position = stop
            if tokens is not None:
                named = named_end_to_end_headers(tokens)
                if named is not None:
                    # (why refused, not ignored: NOT_CONNECTION_OPTIONS in http.py)
                    self._violation(f"upstream's Connection header lists {named}: a header that frames "
                                    f"the response cannot be hop-by-hop")
                parts = _headers_without(bytes(raw[start:end]), tokens)
                position = end - 2
        parts.append(raw[position:end - 2])
        forwarding = self._forwarding
        if via is None:
            parts.append(forwarding.via_line)
        else:
            parts += (b"Via: ", via, b", ", forwarding.via_11, CRLF)
        close = not self._keep_alive
        if status == 101:
            if not req.upgrade or upgrade is None:
                self._violation("upstream switched protocols without an upgrade request")
            self.upgraded = True
            self._mode = _BODY_NONE
            parts += (b"Connection: upgrade\r\nUpgrade: ", upgrade, CRLF)
        else:
            if req.method == HEAD or status == 204 or status == 304:
                self._mode = _BODY_NONE
            elif te is not None:
                if te != b"chunked":
                    self._violation("upstream used a transfer coding other than chunked")
                self._last_chunk_at = -1   # (the previous response's, which this body could match)
                self._chunk_or_close(parts, http10)
                close = close or http10
            elif upstream_keep_alive or b"\ncontent-length:" in raw[start:end].lower():
                # llhttp keeps a connection alive only when the body's end is known without a
                # close: here (not chunked) that means a Content-Length.
                self._mode = _BODY_RAW
            else:
                # Delimited by the upstream closing: re-chunk for HTTP/1.1 clients so that their
                # connection survives; an HTTP/1.0 client gets the same close.
                self._until_eof = True
                self._upstream_keep_alive = False
                self._chunk_or_close(parts, http10)
                close = close or http10
            if close:
                parts.append(b"Connection: close\r\n")
            elif http10:
                parts.append(b"Connection: keep-alive\r\n")
        self.close_client = close
        if self._extra:
            parts.append(self._extra)
        parts.append(CRLF)
        head = b"".join(parts)
        self.head_bytes = len(head)
        self.out.append(head)
        self.head_sent = True
        if req.method == HEAD and status != 101:
            # llhttp would wait for the body that Content-Length announces; a HEAD has none.
            self._finish()
            self._reset_parser = True

    def _chunk_or_close(self, parts: list[bytes], http10: bool) -> None:
        if http10:
            self._mode = _BODY_RAW
        else:
            self._mode = _BODY_CHUNKED
            parts.append(b"Transfer-Encoding: chunked\r\n")

    def on_chunk_header(self) -> None:
        # Noted for feed(): a read that brings no body byte after this is the trailer section.
        self._last_chunk_at = self.body_bytes

    def on_body(self, data: bytes) -> None:
        if self.complete or not data:
            return
        if self._interim:
            # RFC 9112 6.3: an interim response ends with its head. llhttp frames a body for
            # 104-199 by their Content-Length; passed on, it would reach the client outside
            # any response (a forged one, say).
            self._violation("upstream sent a body with an interim (1xx) response")
        self.body_bytes += len(data)
        if self._mode == _BODY_CHUNKED:
            self.out += (b"%x\r\n" % len(data), data, CRLF)
        else:
            self.out.append(data)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self.complete:
            return
        if self._mode == _BODY_CHUNKED:
            self.out.append(b"0\r\n\r\n")
        self._finish()

    def _finish(self) -> None:
        self.complete = True
        self.reusable = self._upstream_keep_alive and not self.upgraded


def _headers_without(head: bytes, tokens: set[bytes]) -> list[bytes]:
    """Rare path (Connection names more headers): rebuild the head line by line."""
    lines = head[:-4].split(b"\r\n")
    parts = [b"HTTP/1.1", lines[0][8:], CRLF]
    for line in lines[1:]:
        lname = line.partition(b":")[0].lower()
        if lname in _RESPONSE_HEADERS or lname in tokens or lname.startswith(b"proxy-"):
            continue
        parts += (line, CRLF)
    return parts
