"""apm_module: the Python connector of apm (connector protocol version 1).

One drop-in file, standard library only, Python 3.6+:

    from apm_module import ApmModule, ApmSession

    def on_connect(s: ApmSession):
        s.write(b'Hello World', {'x-status': '200', 'content-type': 'text/plain'})
        s.close()

    ApmModule(on_connect).run()

apm owns the client's socket and hands each HTTP request, WebSocket or TCP
connection to the app as a session, over the descriptor named by APM_FD
(docs/connector-protocol.md is the contract). The loop is single-threaded:
callbacks run one at a time, and sessions may only be used from them.
"""

import json
import os
import platform
import re
import selectors
import socket
import struct
import sys
import traceback
from collections import deque
from itertools import islice
from urllib.parse import unquote_to_bytes

__all__ = ['ApmModule', 'ApmSession', 'ApmStream', 'PROTOCOL']

PROTOCOL = 1

HELLO, READY = 1, 2
OPEN, DATA, TEXT, MORE, END, HEAD, RAW, CLOSE, CREDIT = 16, 17, 18, 19, 20, 21, 22, 23, 24
# ---- session hand-off (feature "migrate", kinds 48-55) ----
SAVE, MIGRATE, HANDED = 48, 49, 50
# What a save may carry until hello says (session_data_max).
_DEFAULT_SESSION_DATA_MAX = 64 * 1024
# ---- end of session hand-off ----

# Frame prefix: length (of kind + session + payload), kind, session.
_PREFIX = struct.Struct('>IBI')
_U32 = struct.Struct('>I')
_U16 = struct.Struct('>H')

# Until `hello` announces max_frame, the version 1 value bounds frames.
_DEFAULT_MAX_FRAME = 1 << 20
_DEFAULT_WINDOW = 256 * 1024


def _die(message):
    sys.stderr.write('apm_module: %s\n' % message)
    sys.stderr.flush()
    sys.exit(1)


class _ProtocolError(Exception):
    """apm sent something version 1 does not allow: the link is unusable."""


_MALFORMED_ESCAPE = re.compile('%(?![0-9A-Fa-f]{2})')


def _decode(text):
    # As JavaScript's decodeURIComponent, which the Node connector uses: a
    # malformed escape or bytes that are not UTF-8 leave the text as sent.
    if '%' not in text or _MALFORMED_ESCAPE.search(text):
        return text
    try:
        return unquote_to_bytes(text).decode('utf-8')
    except UnicodeDecodeError:
        return text


def _parse_query(query):
    # A repeated key becomes a list, as with Node's querystring.
    result = {}
    for pair in query.split('&'):
        if not pair:
            continue
        name, _, value = pair.partition('=')
        name, value = _decode(name.replace('+', ' ')), _decode(value.replace('+', ' '))
        if name not in result:
            result[name] = value
        elif isinstance(result[name], list):
            result[name].append(value)
        else:
            result[name] = [result[name], value]
    return result


def _parse_cookies(header):
    cookies = {}
    for part in header.split(';'):
        name, sep, value = part.strip().partition('=')
        name = name.strip()
        if not sep or not name or name in cookies:
            # The first of two same-named cookies is the most specific one.
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        cookies[name] = _decode(value)
    return cookies


_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9a-z]+$")
_HEADER_VALUE_BREAKS = re.compile('[\r\n\0]')


def _header_value(name, value):
    value = str(value)
    # apm treats a malformed head as a broken connector and kills the
    # instance; refusing here fails one request instead.
    if _HEADER_VALUE_BREAKS.search(value):
        raise ValueError('header %s: a value may not contain CR, LF or NUL' % name)
    return value


def _head_payload(headers):
    head = {}
    for raw_name, value in headers.items():
        name = str(raw_name).lower()
        if not _HEADER_NAME.match(name):
            raise ValueError('invalid header name: %r' % (raw_name,))
        if isinstance(value, (list, tuple)):
            value = [_header_value(name, v) for v in value]
        else:
            value = _header_value(name, value)
        if name in head:
            # Set-Cookie and set-cookie are one header.
            previous = head[name]
            value = (previous if isinstance(previous, list) else [previous]) + (
                value if isinstance(value, list) else [value])
        head[name] = value
    status = head.get('x-status')
    if status is not None and (isinstance(status, list) or not re.match(r'^[1-9][0-9][0-9]$', status)):
        raise ValueError('x-status must be a three-digit HTTP status, not %r' % (status,))
    return json.dumps(head).encode('utf-8')


def _as_bytes(data):
    if isinstance(data, bytes):
        return data
    # A copy: the app may reuse its bytearray while the bytes wait for credit.
    return memoryview(data).tobytes()


def _utf8_cut(payload, size):
    """The largest cut <= size that does not split a UTF-8 sequence."""
    cut = size
    while cut > 0 and cut < len(payload) and (payload[cut] & 0xC0) == 0x80:
        cut -= 1
    return cut


class ApmSession(object):
    """One HTTP request, WebSocket or TCP connection.

    The app assigns the callbacks it wants:
      on_data(data, is_binary)  body bytes (HTTP), bytes (TCP), or a whole
                                WebSocket message (str for text, bytes for binary)
      on_end()                  HTTP: the request body is complete; TCP: the
                                client finished sending (half-close) and
                                waits for the answer, which close() ends.
                                A TCP session without on_end is closed
                                then, after the writes queued so far
      on_close(code, reason)    apm closed the session (the client went away,
                                or sent a WebSocket close); not called after
                                the app's own close()
    """

    def __init__(self, module, session_id, head):
        self.protocol = head.get('protocol') or 'http'
        self.method = head.get('method') or ''
        self.path = head.get('path') or ''
        # Split before decoding, so that an encoded '/' stays inside its segment.
        self.path_array = [_decode(p) for p in self.path.split('/') if p]
        self.query = head.get('query') or ''
        self.query_object = _parse_query(self.query)
        self.headers = head.get('headers') or {}
        self.cookies = _parse_cookies(self.headers.get('cookie') or '')
        self.remote_ip = head.get('remote_ip')
        self.tls = bool(head.get('tls'))
        self.client_subject = head.get('client_subject')
        self.session_id = session_id
        self.instance_id = module.instance_id
        # Session hand-off: a migrated session starts from what it last saved.
        self.migrated = head.get('migrated') is True
        self.session_data = head.get('session_data', {}) if self.migrated else {}
        self._migrating = False  # apm asked for the session to be handed over
        self.on_data = None
        self.on_end = None
        self.on_close = None

        self._module = module
        self._open = True        # false once a close went out or came in
        self._closing = False    # the app called close(); it waits behind queued writes
        self._started = False    # HTTP: the response has begun (head or body sent)
        self._credit = module._window      # bytes we may still send
        self._allowance = module._window   # bytes apm may still send us
        self._queue = deque()    # [kind, payload] waiting for credit, in order
        self._partial = bytearray()        # a WebSocket message arriving in `more` fragments

    def __repr__(self):
        return '<ApmSession %d %s %s %s>' % (self.session_id, self.protocol, self.method, self.path)

    def write(self, data, headers=None):
        """Send body bytes (HTTP), bytes (TCP) or one WebSocket message.

        For WebSocket a str is a text message and bytes a binary one. For
        HTTP, `headers` on the first write is the response head ('x-status'
        is the status; a list value sends the header several times); later
        headers are ignored. Writes never block: what exceeds the session's
        credit waits in the connector.
        """
        if self._closing or not self._open:
            return
        if self.protocol == 'ws':
            if isinstance(data, str):
                self._enqueue(TEXT, data.encode('utf-8'))
            else:
                self._enqueue(DATA, _as_bytes(data))
            return
        if isinstance(data, str):
            data = data.encode('utf-8')
        else:
            data = _as_bytes(data)
        if self.protocol == 'http' and not self._started:
            # Checked first: a head the app got wrong still leaves room for the 500.
            head = _head_payload(headers) if headers else None
            self._started = True
            if head is not None:
                self._enqueue(HEAD, head)
        if data:
            self._enqueue(DATA, data)

    def write_raw(self, data):
        """Bytes for the client's socket as they are (WebSocket: outside its
        framing; HTTP and TCP: the same as write())."""
        if self._closing or not self._open:
            return
        data = _as_bytes(data.encode('utf-8') if isinstance(data, str) else data)
        self._started = True
        if data:
            self._enqueue(RAW, data)

    def close(self, code=None, reason=None):
        """End the session once the queued writes are out (HTTP: ends the
        response; WebSocket: close code and reason, 1000 by default)."""
        if self._closing or not self._open:
            return
        self._closing = True
        if code is None and reason is None and self.protocol != 'ws':
            payload = b''
        else:
            if code is None:
                code = 1000 if self.protocol == 'ws' else 0
            payload = _U16.pack(code) + (reason or '').encode('utf-8')
        self._enqueue(CLOSE, payload)

    # ---- session hand-off ----
    def save_session_data(self):
        """Keep session_data in apm, which gives it to the instance that
        takes the session over when this one leaves (session_persist).
        Raises ValueError when it is larger than apm keeps, TypeError when
        it is not JSON; returns False once the session has ended."""
        if self._closing or not self._open:
            return False
        payload = json.dumps(self.session_data).encode('utf-8')
        limit = self._module._session_data_max
        if len(payload) > limit:
            raise ValueError('save_session_data(): session_data is %d bytes as JSON; '
                             'apm keeps at most %d per session' % (len(payload), limit))
        self._module._send(SAVE, self.session_id, payload)
        return True

    def _hand_over(self):
        # Callbacks run as frames arrive, so what came before `migrate` has
        # been taken; once the queued writes are out, the session is apm's.
        if self._migrating and self._open and not self._queue:
            self._module._send(HANDED, self.session_id, b'')
            self._forget()
    # ---- end of session hand-off ----

    # The connector's side.

    def _enqueue(self, kind, payload):
        self._queue.append([kind, payload])
        self._pump()

    def _pump(self):
        """Move queued writes to the channel as far as credit allows."""
        module = self._module
        queue = self._queue
        while queue and self._open:
            kind, payload = queue[0]
            if kind == HEAD or kind == CLOSE:
                module._send(kind, self.session_id, payload)
                queue.popleft()
                if kind == CLOSE:
                    self._forget()
                continue
            room = min(module._max_frame, self._credit)
            if len(payload) <= room:
                module._send(kind, self.session_id, payload)
                self._credit -= len(payload)
                queue.popleft()
                continue
            # Too big for one frame now: send the part credit allows. A
            # WebSocket message goes out as `more` fragments so that apm
            # reassembles it; bytes of a stream need no such marking.
            if kind == TEXT:
                room = _utf8_cut(payload, room)
            if room == 0:
                return
            lead = MORE if self.protocol == 'ws' and kind in (DATA, TEXT) else kind
            view = memoryview(payload)
            module._send(lead, self.session_id, view[:room])
            self._credit -= room
            queue[0][1] = view[room:]
        self._hand_over()

    def _forget(self):
        self._open = False
        self._queue.clear()
        self._partial = bytearray()
        self._module._sessions.pop(self.session_id, None)

    def _failed(self):
        """An app callback raised: end the session the way the client can
        understand best."""
        if self._closing or not self._open:
            return
        if self.protocol == 'http' and not self._started:
            self.write(b'Internal Server Error\n', {'x-status': '500', 'content-type': 'text/plain'})
        if self.protocol == 'ws':
            self.close(1011, 'internal error')
        else:
            self.close()


# ---- IPC (feature "ipc", docs/connector-protocol.md): begin ----

(SEND, REQUEST, MESSAGE, REPLY, RESULT, STREAM_OPEN, STREAM_OFFER, STREAM_ACCEPT,
 STREAM_JOIN, STREAM_DATA, STREAM_CLOSE, DASH, METRIC) = range(32, 45)
_METRIC_TYPES = ('counter', 'gauge', 'timing')
_NO_PEER = b'\0\0\0\0'
# Ids this side picks for its requests and the streams it mediates.
_MAX_OWN_ID = 0x7fffffff


def _ipc_call(callback, what, *args):
    try:
        return callback(*args)
    except Exception:
        sys.stderr.write('apm_module: uncaught exception in %s\n' % what)
        traceback.print_exc()
        sys.stderr.flush()
        return None


class ApmStream(object):
    """One stream: the mediator's (from request_stream) or a peer's (on_stream).

    Callbacks the app assigns: on_data(data) on a peer, on_data(data, peer_id)
    on the mediator (str for text, bytes for bytes); on_close(); on the
    mediator also on_join(peer_id) and on_leave(peer_id).
    """

    def __init__(self, module, stream_id, mediator, channel, head):
        self._module = module
        self._id = stream_id
        self.mediator = mediator
        self.channel = channel
        self.head = head
        self.peer_id = None if mediator else stream_id
        self.peers = set()
        self.accepted = mediator
        self.closed = False
        self.on_data = None
        self.on_close = None
        self.on_join = None
        self.on_leave = None

    def accept(self):
        """A peer takes the offer; until then it neither receives nor writes."""
        if not (self.mediator or self.accepted or self.closed):
            self.accepted = True
            self._module._send(STREAM_ACCEPT, self._id, b'')
        return self

    def write(self, data, peer_id=None):
        """Text (str) or bytes; the mediator's go to every peer, or to one.
        Writes to a closed stream are dropped (False)."""
        if self.closed or not self.accepted:
            return False
        text = isinstance(data, str)
        payload = data.encode('utf-8') if text else bytes(data)
        if len(payload) + 5 > self._module._max_frame:
            raise ValueError('write: %d bytes, more than a frame carries (%d)'
                             % (len(payload), self._module._max_frame - 5))
        peer = peer_id if (self.mediator and peer_id) else 0
        self._module._send(STREAM_DATA, self._id, _U32.pack(peer) + (b'\1' if text else b'\0') + payload)
        return True

    def close(self):
        if not self.closed:
            self._module._send(STREAM_CLOSE, self._id, _NO_PEER)
            self._forget()

    def _forget(self):
        self.closed = True
        table = self._module._mediated if self.mediator else self._peer_of
        table.pop(self._id, None)

    @property
    def _peer_of(self):
        return self._module._peer_of


def _check_channel(channel):
    if not isinstance(channel, str) or not channel:
        raise TypeError('a channel is a non-empty string')


def _timeout_ms(timeout):
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
        raise TypeError('a timeout is a number of milliseconds')
    return timeout


class _Ipc(object):
    """The IPC half of ApmModule: send, request, request_stream, on_channel,
    on_stream, set_dash_value and metric (the reference's connector IPC API).
    request and request_stream block, serving the app's sessions and other
    IPC meanwhile, until their answer comes."""

    def _ipc_init(self):
        self.on_channel = None
        self.on_stream = None
        self._next_id = 0
        self._results = {}      # request id -> None while waiting, then (data,)
        self._opening = {}      # stream id -> ApmStream, until a peer joins or it is refused
        self._mediated = {}     # stream id -> ApmStream
        self._peer_of = {}      # peer id -> ApmStream

    def _own_id(self):
        while True:
            self._next_id = 1 if self._next_id >= _MAX_OWN_ID else self._next_id + 1
            i = self._next_id
            if i not in self._results and i not in self._opening and i not in self._mediated:
                return i

    def _send_json(self, kind, ident, value, what):
        payload = json.dumps(value, separators=(',', ':')).encode('utf-8')
        if len(payload) > self._max_frame:
            raise ValueError('%s: %d bytes of JSON, more than a frame carries (%d)'
                             % (what, len(payload), self._max_frame))
        self._start_loop()
        self._send(kind, ident, payload)

    def _wait(self, done):
        """Serves the channel until done() says so."""
        while not done():
            self._drain()
            if done():
                return
            self._flush()
            for _key, events in self._selector.select():
                if events & selectors.EVENT_READ:
                    self._read()

    def send(self, channel, data=None):
        _check_channel(channel)
        self._send_json(SEND, 0, {'channel': channel, 'data': data}, 'send')
        self._flush()

    def request(self, channel, data=None, timeout=None):
        """The first reply's data, or None (timeout in ms, no listener)."""
        _check_channel(channel)
        ident = self._own_id()
        self._send_json(REQUEST, ident, {'channel': channel, 'data': data,
                                         'timeout_ms': _timeout_ms(timeout)}, 'request')
        self._results[ident] = None
        try:
            self._wait(lambda: self._results[ident] is not None)
            return self._results[ident][0]
        finally:
            del self._results[ident]

    def request_stream(self, channel, head=None, timeout=None):
        """An ApmStream once a peer joined, or None when none did."""
        _check_channel(channel)
        ident = self._own_id()
        stream = ApmStream(self, ident, True, channel, head)
        self._send_json(STREAM_OPEN, ident, {'channel': channel, 'head': head,
                                             'timeout_ms': _timeout_ms(timeout)}, 'request_stream')
        self._opening[ident] = stream
        self._wait(lambda: ident not in self._opening)
        return stream if ident in self._mediated else None

    def set_dash_value(self, ident, value, color=None):
        if isinstance(ident, bool) or not isinstance(ident, (str, int, float)):
            raise TypeError('set_dash_value: an id is a string or a number')
        self._send_json(DASH, 0, {'id': ident, 'value': value, 'color': color}, 'set_dash_value')
        self._flush()

    def metric(self, name, value, type='counter'):
        if not isinstance(name, str) or not name:
            raise TypeError('metric: a name is a non-empty string')
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
                or value in (float('inf'), float('-inf')):
            raise TypeError('metric: a value is a finite number')
        if type not in _METRIC_TYPES:
            raise TypeError('metric: a type is one of %s' % ', '.join(_METRIC_TYPES))
        self._send_json(METRIC, 0, {'name': name, 'value': value, 'type': type}, 'metric')
        self._flush()

    def _ipc_json(self, payload, what):
        try:
            value = json.loads(payload.decode('utf-8'))
        except ValueError as e:
            raise _ProtocolError('%s is not JSON: %s' % (what, e))
        if not isinstance(value, dict):
            raise _ProtocolError('%s is not a JSON object' % what)
        return value

    def _ipc_dispatch(self, kind, ident, payload):
        if kind == MESSAGE:
            m = self._ipc_json(payload, 'message')
            if self.on_channel is None:
                return
            replied = [ident == 0]

            def reply(data=None):
                if not replied[0]:
                    replied[0] = True
                    self._send_json(REPLY, ident, {'data': data}, 'reply')
            answer = _ipc_call(self.on_channel, 'on_channel', m.get('channel'), m.get('data'),
                               None if ident == 0 else reply)
            # What the callback returns answers a request it did not reply to.
            if answer is not None:
                reply(answer)
        elif kind == RESULT:
            r = self._ipc_json(payload, 'result')
            if ident in self._results and self._results[ident] is None:
                self._results[ident] = (r.get('data') if r.get('status') == 'reply' else None,)
        elif kind == STREAM_OFFER:
            o = self._ipc_json(payload, 'stream_offer')
            stream = ApmStream(self, ident, False, o.get('channel'), o.get('head'))
            self._peer_of[ident] = stream
            if self.on_stream is None:
                stream.close()
            else:
                _ipc_call(self.on_stream, 'on_stream', stream)
        elif kind in (STREAM_JOIN, STREAM_CLOSE):
            if len(payload) != 4:
                raise _ProtocolError('kind %d with a %d-byte payload' % (kind, len(payload)))
            self._stream_event(kind, ident, _U32.unpack(payload)[0])
        elif kind == STREAM_DATA:
            if len(payload) < 5:
                raise _ProtocolError('stream_data shorter than its peer id and type')
            stream = self._mediated.get(ident) or self._peer_of.get(ident)
            if stream is None or stream.closed or stream.on_data is None:
                return
            data = payload[5:].decode('utf-8', 'replace') if payload[4] == 1 else payload[5:]
            if stream.mediator:
                _ipc_call(stream.on_data, 'on_data', data, _U32.unpack_from(payload)[0])
            else:
                _ipc_call(stream.on_data, 'on_data', data)
        else:
            raise _ProtocolError('IPC kind %d is not for a connector to receive' % kind)

    def _stream_event(self, kind, ident, peer):
        opening = self._opening.pop(ident, None)
        if opening is not None and kind == STREAM_JOIN:
            self._mediated[ident] = opening
        if opening is not None and kind == STREAM_CLOSE:
            return  # refused before any peer joined
        stream = self._mediated.get(ident) or self._peer_of.get(ident)
        if stream is None:
            return
        if kind == STREAM_JOIN:
            stream.peers.add(peer)
            if stream.on_join is not None:
                _ipc_call(stream.on_join, 'on_join', peer)
        elif stream.mediator and peer != 0:
            stream.peers.discard(peer)
            if stream.on_leave is not None:
                _ipc_call(stream.on_leave, 'on_leave', peer)
        else:
            stream._forget()
            if stream.on_close is not None:
                _ipc_call(stream.on_close, 'on_close')

# ---- IPC: end ----


class ApmModule(_Ipc):
    """The connector: checks the environment, greets apm, and runs the loop.

    Attributes after construction: instance_id and worker (from apm's hello).
    """

    def __init__(self, on_connect=None):
        self.on_connect = on_connect
        if os.environ.get('APM') != '1':
            _die('start this app with apm run (APM is not set)')
        fd_text = os.environ.get('APM_FD')
        if not fd_text:
            _die('this worker has no connector channel: give it server lines '
                 'and upstream connector, or listen (APM_FD is not set)')
        try:
            fd = int(fd_text)
            # fromfd duplicates the descriptor (not inheritable), so the
            # original is closed: the app's own children do not get the channel.
            self._sock = socket.fromfd(fd, socket.AF_UNIX, socket.SOCK_STREAM)
            os.close(fd)
        except (ValueError, OSError) as e:
            _die('APM_FD=%s is not a usable channel: %s' % (fd_text, e))
        self._max_frame = _DEFAULT_MAX_FRAME
        self._window = _DEFAULT_WINDOW
        self._session_data_max = _DEFAULT_SESSION_DATA_MAX
        self._sessions = {}
        self._inbuf = bytearray()
        self._out = deque()
        self._selector = None
        self._writing = False
        self._frames = deque()   # frames read, waiting for their turn to be dispatched
        self._ipc_init()  # IPC (feature "ipc")
        try:
            self._handshake()
        except _ProtocolError as e:
            _die('protocol error from apm: %s' % e)

    def _handshake(self):
        # apm writes hello as soon as the process starts, so blocking here
        # is short; it makes instance_id available before run().
        length = _U32.unpack(self._recv_exact(4))[0]
        if not 5 <= length <= 5 + self._max_frame:
            raise _ProtocolError('a frame of %d bytes (the limit is %d)' % (length, 5 + self._max_frame))
        body = self._recv_exact(length)
        if body[0] != HELLO or _U32.unpack_from(body, 1)[0] != 0:
            raise _ProtocolError('the first frame is kind %d, not hello' % body[0])
        try:
            hello = json.loads(body[5:].decode('utf-8'))
            version = hello['protocol']
        except (ValueError, TypeError, KeyError) as e:
            raise _ProtocolError('hello is not a JSON object with a protocol: %s' % e)
        if version != PROTOCOL:
            _die('this connector speaks protocol %d, apm speaks %s; update apm_module' % (PROTOCOL, version))
        self.worker = hello.get('worker')
        self.instance_id = hello.get('instance_id')
        self._max_frame = int(hello.get('max_frame', _DEFAULT_MAX_FRAME))
        self._window = int(hello.get('window', _DEFAULT_WINDOW))
        self._session_data_max = int(hello.get('session_data_max', _DEFAULT_SESSION_DATA_MAX))

    def _recv_exact(self, size):
        chunks = []
        while size:
            chunk = self._sock.recv(size)
            if not chunk:
                sys.exit(0)  # apm closed the channel before greeting
            chunks.append(chunk)
            size -= len(chunk)
        return b''.join(chunks)

    def run(self):
        """Serve sessions until apm closes the channel. Does not return."""
        if self.on_connect is None and self.on_channel is None and self.on_stream is None:
            raise ValueError('ApmModule needs an on_connect(session) handler, or on_channel/on_stream')
        self._start_loop()
        try:
            while True:
                self._flush()
                for _key, events in self._selector.select():
                    if events & selectors.EVENT_READ:
                        self._read()
        except _ProtocolError as e:
            _die('protocol error from apm: %s' % e)

    def _start_loop(self):
        """Says ready, once: run() does, and so does the first IPC call."""
        if self._selector is not None:
            return
        ready = {'protocol': PROTOCOL, 'connector': 'python %s' % platform.python_version(),
                 'half_close': True,
                 'features': ['migrate', 'ipc']}  # session hand-off, IPC
        self._send(READY, 0, json.dumps(ready).encode('utf-8'))
        self._sock.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._sock, selectors.EVENT_READ)

    # The channel.

    def _send(self, kind, session, payload):
        self._out.append(_PREFIX.pack(5 + len(payload), kind, session))
        if len(payload):
            self._out.append(payload)

    def _flush(self):
        out = self._out
        while out:
            try:
                sent = self._sock.sendmsg(list(islice(out, 64)))
            except BlockingIOError:
                break
            except (BrokenPipeError, ConnectionResetError):
                sys.exit(0)  # apm is gone; it restarts or stops us anyway
            while sent:
                first = out[0]
                if len(first) <= sent:
                    sent -= len(first)
                    out.popleft()
                else:
                    out[0] = memoryview(first)[sent:]
                    sent = 0
        # Ask for writability only while something waits, or select spins.
        if bool(out) != self._writing:
            self._writing = bool(out)
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if out else 0)
            self._selector.modify(self._sock, events)

    def _read(self):
        while True:
            try:
                chunk = self._sock.recv(256 * 1024)
            except BlockingIOError:
                return
            except ConnectionResetError:
                chunk = b''
            if not chunk:
                sys.exit(0)  # apm closed the channel: it is stopping this instance
            self._inbuf += chunk
            self._parse()

    def _parse(self):
        buf = self._inbuf
        pos = 0
        try:
            while len(buf) - pos >= 4:
                length = _U32.unpack_from(buf, pos)[0]
                # Checked before waiting for the rest: a bad length must not
                # make us buffer gigabytes.
                if not 5 <= length <= 5 + self._max_frame:
                    raise _ProtocolError('a frame of %d bytes (the limit is %d)'
                                         % (length, 5 + self._max_frame))
                if len(buf) - pos - 4 < length:
                    break
                kind = buf[pos + 4]
                session = _U32.unpack_from(buf, pos + 5)[0]
                payload = bytes(buf[pos + 9:pos + 4 + length])
                pos += 4 + length
                self._frames.append((kind, session, payload))
        finally:
            del buf[:pos]
        self._drain()

    def _drain(self):
        # Frames leave the queue before their callbacks run: a callback that
        # blocks in request() serves the next ones from here, in order.
        frames = self._frames
        while frames:
            self._dispatch(*frames.popleft())

    def _dispatch(self, kind, session_id, payload):
        if 32 <= kind <= 47:  # IPC (feature "ipc")
            return self._ipc_dispatch(kind, session_id, payload)
        if kind not in (OPEN, DATA, TEXT, MORE, END, CLOSE, CREDIT, MIGRATE):
            raise _ProtocolError('kind %d is not for a connector to receive' % kind)
        if session_id == 0:
            raise _ProtocolError('kind %d on the channel instead of a session' % kind)
        if kind == OPEN:
            self._open_session(session_id, payload)
            return
        session = self._sessions.get(session_id)
        if session is None:
            return  # it ended; frames may cross a close on the wire
        if kind == MIGRATE:
            if payload:
                raise _ProtocolError('a migrate with a payload')
            if not session._closing:
                session._migrating = True
                session._hand_over()
        elif kind == CREDIT:
            if len(payload) != 4:
                raise _ProtocolError('a credit of %d bytes' % len(payload))
            session._credit += _U32.unpack(payload)[0]
            session._pump()
        elif kind == CLOSE:
            if len(payload) == 1:
                raise _ProtocolError('a close of one byte')
            code = _U16.unpack_from(payload)[0] if payload else 0
            reason = payload[2:].decode('utf-8', 'replace')
            app_closed = session._closing
            session._forget()
            if not app_closed:
                self._call(session, session.on_close, code, reason)
        elif kind == END:
            if session._closing:
                pass
            elif session.on_end is None and session.protocol == 'tcp':
                # As a socket that does not allow half-open connections:
                # the client is done, so is the session, once its answer is out.
                session.close()
            else:
                self._call(session, session.on_end)
        else:
            self._receive(session, kind, payload)

    def _open_session(self, session_id, payload):
        if session_id in self._sessions:
            raise _ProtocolError('open for session %d, which is open' % session_id)
        try:
            head = json.loads(payload.decode('utf-8'))
        except ValueError as e:
            raise _ProtocolError('open is not JSON: %s' % e)
        if not isinstance(head, dict):
            raise _ProtocolError('open is not a JSON object')
        session = ApmSession(self, session_id, head)
        self._sessions[session_id] = session
        self._call(session, self.on_connect, session)

    def _receive(self, session, kind, payload):
        session._allowance -= len(payload)
        if session._allowance < 0:
            raise _ProtocolError('session %d: data beyond the window' % session.session_id)
        if session._closing:
            return  # the app has answered; nobody wants the rest
        if session.protocol == 'ws':
            if kind == MORE:
                # apm sends the rest of a big message only as credit comes
                # back, so fragments are credited as soon as they are buffered.
                session._partial += payload
                self._give_credit(session, len(payload))
                return
            message = payload
            if session._partial:
                session._partial += payload
                message = bytes(session._partial)
                session._partial = bytearray()
            if kind == TEXT:
                try:
                    message = message.decode('utf-8')
                except UnicodeDecodeError:
                    raise _ProtocolError('session %d: a text message that is not UTF-8' % session.session_id)
            self._call(session, session.on_data, message, kind == DATA)
        else:
            # A byte stream: `more` fragments are just bytes, passed on as they come.
            self._call(session, session.on_data, payload, True)
        # Consumed once the app's callback has returned.
        self._give_credit(session, len(payload))

    def _give_credit(self, session, size):
        if size and session._open:
            session._allowance += size
            self._send(CREDIT, session.session_id, _U32.pack(size))

    def _call(self, session, callback, *args):
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:
            # The app's bug ends its session, not the instance.
            sys.stderr.write('apm_module: session %d: uncaught exception in %s\n'
                             % (session.session_id, getattr(callback, '__name__', 'a callback')))
            traceback.print_exc()
            sys.stderr.flush()
            session._failed()
