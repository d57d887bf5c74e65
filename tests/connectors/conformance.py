#!/usr/bin/env python3
"""Connector conformance: plays apm's side of docs/connector-protocol.md
against any connector app that follows the connector_echo test app spec.

    python3 tests/connectors/conformance.py python3 tests/apps/connector_echo.py
    python3 tests/connectors/conformance.py node tests/apps/connector_echo.js

The command gets one end of a socket pair as fd 3 with APM=1 APM_FD=3,
as under the daemon; its stdout and stderr go to files of their own.
Prints `ok <case>` or `FAIL <case>: why` per case and exits with status 1
if any case failed. Every wait has a deadline; nothing sleeps.
Python 3 standard library only.
"""

import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback

HELLO, READY = 1, 2
OPEN, DATA, TEXT, MORE, END, HEAD, RAW, CLOSE, CREDIT = 16, 17, 18, 19, 20, 21, 22, 23, 24
# Session hand-off (feature "migrate").
SAVE, MIGRATE, HANDED = 48, 49, 50
SESSION_DATA_MAX = 65536
NAMES = {1: 'hello', 2: 'ready', 16: 'open', 17: 'data', 18: 'text', 19: 'more',
         20: 'end', 21: 'head', 22: 'raw', 23: 'close', 24: 'credit',
         48: 'save', 49: 'migrate', 50: 'handed'}
FLOW_CONTROLLED = (DATA, TEXT, MORE, RAW)
FROM_CHILD = (READY, DATA, TEXT, MORE, HEAD, RAW, CLOSE, CREDIT, SAVE, HANDED)

MAX_FRAME = 1 << 20
WINDOW = 256 * 1024
# apm cuts messages into `more` fragments of this size.
FRAGMENT = min(MAX_FRAME, WINDOW)
TIMEOUT = 10.0
INSTANCE_ID = 7
APM_INDEX = '5'

NO_APM = 'apm_module: start this app with apm run (APM is not set)'
MISMATCH = 'apm_module: this connector speaks protocol 1, apm speaks 99; update apm_module'


class Fail(Exception):
    pass


def expect(condition, why):
    if not condition:
        raise Fail(why)


def frame(kind, session, payload=b''):
    return struct.pack('>IBI', 5 + len(payload), kind, session) + payload


def close_payload(code, reason=''):
    return struct.pack('>H', code) + reason.encode('utf-8')


def hello(protocol=1):
    return json.dumps({'protocol': protocol, 'worker': 'conformance', 'instance_id': INSTANCE_ID,
                       'max_frame': MAX_FRAME, 'window': WINDOW,
                       'session_data_max': SESSION_DATA_MAX}).encode('utf-8')


class Child(object):
    """The command under test, with the child end of a socket pair as fd 3."""

    def __init__(self, command, apm=True, apm_fd=True):
        self.sock, theirs = socket.socketpair()
        self.stdout = tempfile.TemporaryFile()
        self.stderr = tempfile.TemporaryFile()
        env = dict((k, v) for k, v in os.environ.items() if not k.startswith('APM'))
        if apm:
            env['APM'] = '1'
        if apm_fd:
            env['APM_FD'] = '3'
        env['APM_INDEX'] = APM_INDEX
        fd = theirs.fileno()

        def to_fd3():
            # dup2 leaves the new descriptor inheritable; our sockets are not.
            if fd == 3:
                os.set_inheritable(3, True)
            else:
                os.dup2(fd, 3)

        try:
            self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self.stdout,
                                         stderr=self.stderr, env=env, close_fds=False,
                                         preexec_fn=to_fd3, start_new_session=True)
        except OSError as e:
            sys.stdout.write('FAIL start: cannot run %r: %s\n' % (command, e))
            sys.exit(1)
        theirs.close()

    def wait_exit(self, timeout=TIMEOUT):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def exit_note(self):
        status = self.proc.poll()
        return '' if status is None else ' (the child exited with status %d)' % status

    def output(self, stream):
        stream.seek(0)
        return stream.read()

    def stderr_lines(self):
        return self.output(self.stderr).decode('utf-8', 'replace').splitlines()

    def kill(self):
        # The child leads its own process group: this also ends what it started.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        self.proc.wait()
        self.sock.close()


class Session(object):
    """apm's view of one session: what it may send, and what the child sent."""

    def __init__(self, session_id, protocol):
        self.id = session_id
        self.protocol = protocol
        self.credit = WINDOW        # bytes we may still send the child
        self.allowance = WINDOW     # bytes the child may still send us
        self.withhold = False       # keep the child's credit instead of returning it
        self.ungranted = 0
        self.received = 0
        self.head = None
        self.body = bytearray()     # http, tcp: data, more and raw bytes in order
        self.messages = []          # ws: complete (kind, bytes) messages
        self.partial = None
        self.saved = []             # session hand-off: the payloads of `save`, in order
        self.migrating = False      # `migrate` was sent
        self.handed = False
        self.more_frames = 0
        self.raw = []               # ws: raw frames
        self.closed = None          # (code, reason) once the child closed it

    def status(self):
        status = (self.head or {}).get('x-status', '200')
        try:
            return int(status)
        except (TypeError, ValueError):
            return status  # reported as it is by the failing check

    def header(self, name):
        return (self.head or {}).get(name)


class Link(object):
    """apm's end of the channel."""

    def __init__(self, child):
        self.child = child
        self.sock = child.sock
        self.sock.settimeout(TIMEOUT)
        self.buf = bytearray()
        self.sessions = {}      # open sessions by id
        self.ended = set()      # ids the child closed: later frames are violations
        self.dropped = {}       # ids we closed -> frames (not credit) the child sent after
        self.ready = None
        self.violations = []
        self.broken = None      # why nothing more can be read
        self.next_id = 1
        self.piece_size = None  # send frames in pieces of this many bytes

    def send(self, kind, session, payload=b''):
        wire = frame(kind, session, payload)
        try:
            if self.piece_size is None:
                self.sock.sendall(wire)
                return
            for start in range(0, len(wire), self.piece_size):
                self.sock.sendall(wire[start:start + self.piece_size])
                # A pause between pieces, so that the child reads them one by one.
                time.sleep(0.0005)
        except socket.timeout:
            raise Fail('the child stopped reading its channel (a write timed out)')
        except OSError as e:
            raise Fail('cannot write to the channel: %s%s' % (e, self.child.exit_note()))

    def poll(self, timeout):
        if self.broken:
            return
        readable, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        if not readable:
            return
        try:
            chunk = self.sock.recv(1 << 20)
        except OSError:
            chunk = b''
        if not chunk:
            self.broken = 'the child closed its channel'
            return
        self.buf += chunk
        pos = 0
        while len(self.buf) - pos >= 4:
            length = struct.unpack_from('>I', self.buf, pos)[0]
            if not 5 <= length <= 5 + MAX_FRAME:
                self.broken = 'the child sent a frame of %d bytes (the limit is %d)' % (length, 5 + MAX_FRAME)
                self.violations.append(self.broken)
                return
            if len(self.buf) - pos - 4 < length:
                break
            kind = self.buf[pos + 4]
            session = struct.unpack_from('>I', self.buf, pos + 5)[0]
            payload = bytes(self.buf[pos + 9:pos + 4 + length])
            pos += 4 + length
            self.handle(kind, session, payload)
        del self.buf[:pos]

    def violation(self, why):
        self.violations.append(why)

    def handle(self, kind, session_id, payload):
        name = NAMES.get(kind, 'kind %d' % kind)
        if kind not in FROM_CHILD:
            return self.violation('the child sent %s' % name)
        if kind == READY:
            if session_id != 0:
                self.violation('ready on session %d' % session_id)
            try:
                self.ready = json.loads(payload.decode('utf-8'))
            except ValueError:
                self.violation('ready is not JSON: %r' % payload[:100])
                self.ready = {}
            return
        if session_id == 0:
            return self.violation('%s on session 0' % name)
        s = self.sessions.get(session_id)
        if s is None:
            if session_id in self.dropped:
                # Credit may cross our close; anything else is counted
                # for the cases that know nothing could cross.
                if kind != CREDIT:
                    self.dropped[session_id] += 1
            elif session_id in self.ended:
                self.violation('%s on session %d after the child closed it' % (name, session_id))
            else:
                self.violation('%s on session %d, which was never opened' % (name, session_id))
            return
        if kind in FLOW_CONTROLLED:
            s.allowance -= len(payload)
            s.received += len(payload)
            if s.allowance < 0 <= s.allowance + len(payload):  # once, where it crosses
                self.violation('session %d: the child sent %d bytes beyond its credit'
                               % (session_id, -s.allowance))
            if s.withhold:
                s.ungranted += len(payload)
            elif payload:
                # As apm does once the bytes are on their way to the client.
                s.allowance += len(payload)
                self.send(CREDIT, session_id, struct.pack('>I', len(payload)))
        if kind == HEAD:
            self.check_head(s, payload)
        elif kind in (DATA, TEXT, MORE):
            if s.protocol == 'ws':
                if kind == MORE:
                    s.more_frames += 1
                    s.partial = (s.partial or bytearray()) + payload
                else:
                    s.messages.append((kind, bytes(s.partial or b'') + payload))
                    s.partial = None
            else:
                if kind == TEXT:
                    self.violation('text on the %s session %d' % (s.protocol, session_id))
                s.body += payload
        elif kind == RAW:
            if s.protocol == 'ws':
                s.raw.append(payload)
            else:
                s.body += payload
        elif kind == CLOSE:
            if len(payload) == 1:
                self.violation('a close of one byte on session %d' % session_id)
            code = struct.unpack_from('>H', payload)[0] if len(payload) >= 2 else None
            try:
                reason = payload[2:].decode('utf-8')
            except UnicodeDecodeError:
                self.violation('a close reason that is not UTF-8 on session %d' % session_id)
                reason = ''
            s.closed = (code, reason)
            del self.sessions[session_id]
            self.ended.add(session_id)
        elif kind == CREDIT:
            if len(payload) != 4:
                self.violation('a credit of %d bytes on session %d' % (len(payload), session_id))
            else:
                s.credit += struct.unpack('>I', payload)[0]
        elif kind == SAVE:
            if len(payload) > SESSION_DATA_MAX:
                self.violation('a save of %d bytes on session %d' % (len(payload), session_id))
            try:
                s.saved.append(json.loads(payload.decode('utf-8')))
            except ValueError:
                self.violation('a save that is not JSON on session %d: %r' % (session_id, payload[:100]))
        elif kind == HANDED:
            if payload:
                self.violation('a handed with a payload on session %d' % session_id)
            if not s.migrating:
                self.violation('handed on session %d, which was not sent migrate' % session_id)
            s.handed = True
            del self.sessions[session_id]
            self.ended.add(session_id)

    def check_head(self, s, payload):
        if s.protocol != 'http':
            return self.violation('head on the %s session %d' % (s.protocol, s.id))
        if s.head is not None or s.body:
            return self.violation('head on session %d after the response began' % s.id)
        try:
            head = json.loads(payload.decode('utf-8'))
        except ValueError:
            return self.violation('head is not JSON: %r' % payload[:100])
        if not isinstance(head, dict):
            return self.violation('head is not a JSON object: %r' % payload[:100])
        for name, value in head.items():
            if not (isinstance(value, str) or
                    (isinstance(value, list) and all(isinstance(v, str) for v in value))):
                self.violation('head header %s is %r, not a string or an array of strings' % (name, value))
        s.head = dict((k.lower(), v) for k, v in head.items())

    def wait(self, condition, what, timeout=TIMEOUT):
        """Reads frames until condition() holds; `what` (a string or a
        function giving one) says what was awaited if it never does."""
        deadline = time.monotonic() + timeout
        while not condition():
            describe = what() if callable(what) else what
            if self.broken:
                raise Fail('%s while waiting for %s%s' % (self.broken, describe, self.child.exit_note()))
            left = deadline - time.monotonic()
            if left <= 0:
                raise Fail('no %s within %gs%s' % (describe, timeout, self.child.exit_note()))
            self.poll(min(left, 0.5))

    # Sessions, as apm drives them.

    def open(self, protocol, method='GET', path='/', query='', headers=None, session_id=None, **head):
        if session_id is None:
            session_id = self.next_id
            self.next_id += 1
        fields = {'protocol': protocol, 'method': method, 'path': path, 'query': query,
                  'headers': headers or {}, 'remote_ip': '203.0.113.9', 'tls': False,
                  'client_subject': None}
        fields.update(head)
        s = Session(session_id, protocol)
        self.sessions[session_id] = s
        self.ended.discard(session_id)
        self.dropped.pop(session_id, None)
        self.send(OPEN, session_id, json.dumps(fields).encode('utf-8'))
        return s

    def send_message(self, s, kind, data):
        """One message (or body chunk) cut as apm cuts it: `more` fragments
        of FRAGMENT bytes, then `kind`, each sent once credit covers it."""
        view = memoryview(data)
        while True:
            last = len(view) <= FRAGMENT
            piece = view if last else view[:FRAGMENT]
            self.wait(lambda: s.credit >= len(piece),
                      lambda: 'credit from the child on session %d (it left %d bytes, %d needed)'
                      % (s.id, s.credit, len(piece)))
            s.credit -= len(piece)
            self.send(kind if last else MORE, s.id, piece.tobytes())
            if last:
                return
            view = view[FRAGMENT:]

    def close(self, s, code=0, reason=''):
        self.send(CLOSE, s.id, close_payload(code, reason))
        del self.sessions[s.id]
        self.dropped[s.id] = 0

    def http(self, method, path, query='', headers=None, body=b'', **head):
        s = self.open('http', method, path, query, headers, **head)
        if body:
            self.send_message(s, DATA, body)
        self.send(END, s.id)
        return s

    def finish(self, s, what):
        self.wait(lambda: s.closed is not None, what)
        return s

    def barrier(self):
        """A request answered after everything sent before it was handled."""
        self.finish(self.http('GET', '/barrier'), 'the answer to a barrier request')

    def ws_roundtrip(self, s, kind, payload, what):
        count = len(s.messages)
        self.send_message(s, kind, payload)
        self.wait(lambda: len(s.messages) > count or s.closed is not None, what)
        expect(len(s.messages) > count, 'the child closed the session (%r) instead of echoing' % (s.closed,))
        got_kind, got = s.messages[count]
        expect(got_kind == kind, 'the echo is a %s message, not %s' % (NAMES[got_kind], NAMES[kind]))
        expect(got == payload, 'the echo differs: %s' % differ(got, payload))


def differ(got, want):
    if len(got) != len(want):
        return 'got %d bytes, sent %d' % (len(got), len(want))
    first = next((i for i in range(len(got)) if got[i] != want[i]), None)
    return 'identical' if first is None else 'first difference at byte %d' % first


def json_answer(s):
    expect(s.status() == 200, 'status %r' % (s.status(),))
    content_type = s.header('content-type') or ''
    expect('application/json' in str(content_type), 'content-type is %r' % content_type)
    try:
        return json.loads(bytes(s.body).decode('utf-8'))
    except ValueError as e:
        raise Fail('the answer is not JSON (%s): %r' % (e, bytes(s.body[:200])))


# The cases. Each returns an optional note, or raises Fail.

def case_no_apm(child):
    status = child.wait_exit()
    expect(status is not None, 'still running %gs after starting without APM' % TIMEOUT)
    expect(status == 1, 'exit status %d, not 1' % status)
    expect(NO_APM in child.stderr_lines(), 'stderr lacks the line %r: %r' % (NO_APM, child.stderr_lines()))


def case_no_apm_fd(child):
    status = child.wait_exit()
    expect(status is not None, 'still running %gs after starting without APM_FD' % TIMEOUT)
    expect(status == 1, 'exit status %d, not 1' % status)
    lines = [l for l in child.stderr_lines() if l.startswith('apm_module:') and 'APM_FD' in l]
    expect(lines, 'no stderr line starting with apm_module: names APM_FD: %r' % child.stderr_lines())
    return lines[0]


def case_protocol_mismatch(child):
    link = Link(child)
    link.send(HELLO, 0, hello(protocol=99))
    status = child.wait_exit()
    expect(status is not None, 'still running %gs after a hello with protocol 99' % TIMEOUT)
    expect(status == 1, 'exit status %d, not 1' % status)
    expect(MISMATCH in child.stderr_lines(), 'stderr lacks the line %r: %r' % (MISMATCH, child.stderr_lines()))
    link.poll(0)
    expect(link.ready is None, 'it answered ready to protocol 99')


def case_handshake(link, ctx):
    link.send(HELLO, 0, hello())
    link.wait(lambda: link.ready is not None, 'ready')
    expect(link.ready.get('protocol') == 1, 'ready says protocol %r' % link.ready.get('protocol'))
    expect(isinstance(link.ready.get('connector'), str), 'ready has no connector text: %r' % link.ready)
    expect(link.ready.get('half_close') is True, 'ready does not say half_close: %r' % link.ready)
    return 'connector %r' % link.ready['connector']


def case_http_request_fields(link, ctx):
    headers = {'host': 'example.test', 'cookie': 'sid=abc123; theme=dark', 'x-test': 'yes',
               'x-forwarded-for': '203.0.113.7'}
    s = link.finish(link.http('GET', '/api/v1/items', 'a=1&b=x%20y', headers,
                              remote_ip='203.0.113.7', tls=True, client_subject='CN=client,O=apm test'),
                    'the JSON answer')
    answer = json_answer(s)
    wrong = []
    for key, want in [('method', 'GET'), ('path', '/api/v1/items'), ('path_array', ['api', 'v1', 'items']),
                      ('query', 'a=1&b=x%20y'), ('query_object', {'a': '1', 'b': 'x y'}),
                      ('cookies', {'sid': 'abc123', 'theme': 'dark'}), ('remote_ip', '203.0.113.7'),
                      ('instance_id', INSTANCE_ID), ('session_id', s.id),
                      ('client_subject', 'CN=client,O=apm test'), ('tls', True), ('body_length', 0)]:
        if answer.get(key) != want:
            wrong.append('%s is %r, not %r' % (key, answer.get(key), want))
    if (answer.get('headers') or {}).get('x-test') != 'yes':
        wrong.append('headers lack x-test: %r' % answer.get('headers'))
    if str(answer.get('env_index')) != APM_INDEX:
        wrong.append('env_index is %r, not %r' % (answer.get('env_index'), APM_INDEX))
    if not isinstance(answer.get('pid'), int):
        wrong.append('pid is %r' % answer.get('pid'))
    expect(not wrong, '; '.join(wrong))
    ctx['lang'] = answer.get('lang')
    return 'lang %r' % answer.get('lang')


def case_http_malformed_escapes(link, ctx):
    # A malformed escape or bytes that are not UTF-8 leave a piece as the
    # client sent it, in every language (as JavaScript's decodeURIComponent).
    headers = {'host': 'example.test', 'cookie': 'c=%ff; d=%41; e=%e2%82%ac'}
    s = link.finish(link.http('GET', '/a%zz/%ff%00/%41%zz/%e2%82%ac/%41', 'q=%zz&r=%e9&s=%e2%82%ac&t=a+b%21',
                              headers), 'the JSON answer')
    answer = json_answer(s)
    wrong = []
    for key, want in [('path_array', ['a%zz', '%ff%00', '%41%zz', '\u20ac', 'A']),
                      ('query_object', {'q': '%zz', 'r': '%e9', 's': '\u20ac', 't': 'a b!'}),
                      ('cookies', {'c': '%ff', 'd': 'A', 'e': '\u20ac'})]:
        if answer.get(key) != want:
            wrong.append('%s is %r, not %r' % (key, answer.get(key), want))
    expect(not wrong, '; '.join(wrong))


def case_http_status(link, ctx):
    s = link.finish(link.http('GET', '/status/404'), 'the answer')
    expect(s.status() == 404, 'status %r, not 404' % (s.status(),))
    expect(bytes(s.body) == b'status 404', 'body %r' % bytes(s.body))
    expect('text/plain' in str(s.header('content-type')), 'content-type %r' % s.header('content-type'))


def case_http_cookies(link, ctx):
    s = link.finish(link.http('GET', '/cookies'), 'the answer')
    expect(s.status() == 200, 'status %r' % (s.status(),))
    expect(s.header('set-cookie') == ['a=1', 'b=2'], 'set-cookie is %r' % s.header('set-cookie'))
    expect(bytes(s.body) == b'ok', 'body %r' % bytes(s.body))


def case_http_echo_empty(link, ctx):
    s = link.finish(link.http('POST', '/echo', headers={'content-length': '0'}), 'the answer')
    expect(s.status() == 200, 'status %r' % (s.status(),))
    expect('application/octet-stream' in str(s.header('content-type')),
           'content-type %r' % s.header('content-type'))
    expect(not s.body, 'body %r' % bytes(s.body[:100]))


def case_http_echo_flow_control(link, ctx):
    body = os.urandom(3 << 20)
    s = link.open('http', 'POST', '/echo', headers={'content-length': str(len(body))})
    s.withhold = True
    # Chunks larger than a fragment, as a client's may be: apm sends them
    # as `more` + `data`, which on HTTP are plain body bytes.
    for offset in range(0, len(body), 700000):
        link.send_message(s, DATA, body[offset:offset + 700000])
    link.send(END, s.id)
    link.barrier()
    held = s.received
    expect(held <= WINDOW, 'sent %d bytes with a credit of %d' % (held, WINDOW))
    expect(held > 0, 'sent nothing of the echo within its first window')
    expect(s.closed is None, 'closed the session with only %d of %d bytes sent' % (held, len(body)))
    s.withhold = False
    s.allowance += s.ungranted
    link.send(CREDIT, s.id, struct.pack('>I', s.ungranted))
    s.ungranted = 0
    link.finish(s, lambda: 'the rest of the echo (%d of %d bytes so far)' % (len(s.body), len(body)))
    expect(s.status() == 200, 'status %r' % (s.status(),))
    expect(bytes(s.body) == body, 'the echo differs: %s' % differ(bytes(s.body), body))
    return 'held at %d bytes until credit came' % held


def case_frames_in_pieces(link, ctx):
    """Frames that arrive cut anywhere, even inside a length prefix: a
    connector must reassemble them across reads."""
    body = b'0123456789' * 30
    link.piece_size = 3
    try:
        s = link.http('POST', '/echo', headers={'content-length': str(len(body))}, body=body)
    finally:
        link.piece_size = None
    link.finish(s, 'the echo of a request sent 3 bytes at a time')
    expect(s.status() == 200, 'status %r' % (s.status(),))
    expect(bytes(s.body) == body, 'the echo differs: %s' % differ(bytes(s.body), body))


def case_concurrent_sessions(link, ctx):
    sessions = [link.open('http', 'POST', '/json', 'i=%d' % i) for i in range(20)]
    for i, s in enumerate(sessions):
        if i:
            link.send_message(s, DATA, b'x' * (i * 100))
    for s in reversed(sessions):
        link.send(END, s.id)
    link.wait(lambda: all(s.closed is not None for s in sessions),
              lambda: 'answers to 20 concurrent requests (%d so far)'
              % sum(s.closed is not None for s in sessions))
    for i, s in enumerate(sessions):
        answer = json_answer(s)
        got = (answer.get('session_id'), answer.get('query_object'), answer.get('body_length'))
        want = (s.id, {'i': str(i)}, i * 100)
        expect(got == want, 'session %d got the answer (session_id, query_object, body_length) %r, not %r'
               % (s.id, got, want))


WS_HEADERS = {'host': 'example.test', 'upgrade': 'websocket', 'connection': 'upgrade',
              'sec-websocket-version': '13'}


def case_ws_text(link, ctx):
    s = ctx['ws'] = link.open('ws', 'GET', '/ws', headers=WS_HEADERS)
    link.ws_roundtrip(s, TEXT, b'hello', 'the echo of a text message')
    link.ws_roundtrip(s, TEXT, u'h\u00e9llo \u2713 \U0001F600'.encode('utf-8'), 'the echo of a non-ASCII text')


def case_ws_binary(link, ctx):
    link.ws_roundtrip(ctx['ws'], DATA, bytes(range(256)) * 3, 'the echo of a binary message')


def case_ws_big_messages(link, ctx):
    s = ctx['ws']
    before = s.more_frames
    link.ws_roundtrip(s, DATA, os.urandom(5 << 19), 'the echo of a 2.5 MiB binary message')
    expect(s.more_frames > before, 'the echo came without more fragments')
    text = (u'\u00e9\u2713abc' * 60000).encode('utf-8')  # 480 KB, fragment cuts may fall mid-character
    link.ws_roundtrip(s, TEXT, text, 'the echo of a %d byte text message' % len(text))
    return '%d more fragments received' % (s.more_frames - before)


def case_ws_raw(link, ctx):
    s = ctx['ws']
    count = len(s.raw)
    link.send_message(s, TEXT, b'raw')
    link.wait(lambda: len(s.raw) > count or s.closed is not None, 'a raw frame')
    expect(s.raw[count:] == [b'\x81\x04raw!'], 'raw frames %r' % s.raw[count:])


def case_ws_close(link, ctx):
    s = ctx['ws']
    link.send_message(s, TEXT, b'close')
    link.finish(s, 'a close frame')
    expect(s.closed == (4000, 'bye'), 'closed with %r, not (4000, "bye")' % (s.closed,))


def case_tcp(link, ctx):
    s = link.open('tcp', '', '', remote_ip='198.51.100.4')
    link.send_message(s, DATA, b'hello tcp\n')
    link.wait(lambda: len(s.body) >= 10 or s.closed is not None, 'the echo of tcp bytes')
    expect(bytes(s.body) == b'hello tcp\n', 'echo %r' % bytes(s.body))
    link.send_message(s, DATA, b'quit\n')
    link.finish(s, 'the close after quit')
    expect(bytes(s.body) == b'hello tcp\nquit\n', 'received %r' % bytes(s.body))
    expect(s.closed[0] in (None, 0), 'close code %r, not 0' % (s.closed[0],))


def case_tcp_half_close(link, ctx):
    # The client finished sending: the app hears end and still answers.
    s = link.open('tcp', '', '', remote_ip='198.51.100.4')
    link.send_message(s, DATA, b'ping\n')
    link.send(END, s.id)
    link.finish(s, 'the close after the answer to a half-close')
    expect(bytes(s.body) == b'ping\nbye\n', 'received %r' % bytes(s.body))
    expect(s.closed[0] in (None, 0), 'close code %r, not 0' % (s.closed[0],))


def case_apm_closes_sessions(link, ctx):
    # The connector must forget a session apm closed: a late end gets no answer.
    s = link.open('http', 'POST', '/json', 'n=1')
    link.send_message(s, DATA, b'abc')
    link.close(s)
    link.send(DATA, s.id, b'late')
    link.send(END, s.id)
    w = link.open('ws', 'GET', '/ws', headers=WS_HEADERS)
    link.close(w, 1001, 'going away')
    link.send(TEXT, w.id, b'hello?')
    # Sessions that never existed.
    for kind, payload in [(DATA, b'x'), (TEXT, b'y'), (MORE, b'z'), (END, b''),
                          (CREDIT, struct.pack('>I', 100)), (CLOSE, close_payload(1000))]:
        link.send(kind, 4242, payload)
    link.barrier()
    expect(link.dropped[s.id] == 0, 'answered session %d after apm closed it' % s.id)
    expect(link.dropped[w.id] == 0, 'echoed on session %d after apm closed it' % w.id)
    # An id is free again once closed.
    again = link.finish(link.http('POST', '/json', 'reuse=1', body=b'12345', session_id=s.id),
                        'the answer on a reused session id')
    answer = json_answer(again)
    got = (answer.get('session_id'), answer.get('query_object'), answer.get('body_length'))
    expect(got == (s.id, {'reuse': '1'}, 5), 'the reused id got %r' % (got,))


# ---- session hand-off (feature "migrate") ----

def case_ready_lists_migrate(link, ctx):
    features = link.ready.get('features')
    expect(isinstance(features, list) and 'migrate' in features,
           'ready has features %r, without "migrate"' % (features,))


def ws_says(link, s, text, what):
    count = len(s.messages)
    link.send_message(s, TEXT, text.encode('utf-8'))
    link.wait(lambda: len(s.messages) > count or s.closed is not None, what)
    expect(len(s.messages) > count, 'the child closed the session (%r)' % (s.closed,))
    return s.messages[count][1].decode('utf-8')


def migrate(link, s, pieces=None):
    s.migrating = True
    link.piece_size = pieces
    try:
        link.send(MIGRATE, s.id)
    finally:
        link.piece_size = None


def case_save_then_hand_off(link, ctx):
    """save_session_data() sends `save`; after `migrate` the connector
    sends what the app wrote, then `handed`, and forgets the session."""
    s = link.open('ws', 'GET', '/ws', headers=WS_HEADERS)
    answer = ws_says(link, s, 'save {"total": 6, "who": "\u00e9"}', 'the answer to a save')
    expect(answer == 'saved', 'the app answered %r' % answer)
    expect(s.saved == [{'total': 6, 'who': u'\u00e9'}], 'saved %r' % (s.saved,))
    migrate(link, s, pieces=3)
    link.wait(lambda: s.handed or s.closed is not None, '`handed` after `migrate` (sent in 3-byte pieces)')
    expect(s.closed is None, 'the child closed the session (%r) instead of handing it' % (s.closed,))
    # The session is forgotten: a late frame gets nothing back.
    link.dropped[s.id] = 0
    link.send(TEXT, s.id, b'late')
    link.barrier()
    expect(link.dropped[s.id] == 0, 'the child answered on session %d after handing it' % s.id)


def case_hand_off_waits_for_queued_writes(link, ctx):
    """A write still waiting for credit goes out before `handed`."""
    s = link.open('ws', 'GET', '/ws', headers=WS_HEADERS)
    big = os.urandom(WINDOW + 1000)
    s.withhold = True
    link.send_message(s, DATA, big)
    link.wait(lambda: s.allowance <= 0 or s.closed is not None,
              'the echo to use up the credit (%d bytes received)' % s.received)
    migrate(link, s)
    link.barrier()
    expect(not s.handed, '`handed` while %d bytes of a write still waited for credit' % (len(big) - s.received))
    s.withhold = False
    link.send(CREDIT, s.id, struct.pack('>I', s.ungranted))
    s.allowance += s.ungranted
    s.ungranted = 0
    link.wait(lambda: s.handed or s.closed is not None, '`handed` once the write was out')
    expect(s.messages and s.messages[-1] == (DATA, big), 'the echo before `handed` differs')


def case_migrated_open_carries_session_data(link, ctx):
    s = link.open('ws', 'GET', '/ws', headers=WS_HEADERS, migrated=True,
                  session_data={'total': 6, 'list': [1, 2]})
    answer = json.loads(ws_says(link, s, 'data?', 'the session data of a migrated session'))
    want = {'migrated': True, 'session_data': {'total': 6, 'list': [1, 2]}}
    expect(answer == want, 'the app sees %r, not %r' % (answer, want))
    fresh = link.open('ws', 'GET', '/ws', headers=WS_HEADERS)
    answer = json.loads(ws_says(link, fresh, 'data?', 'the session data of a new session'))
    expect(answer == {'migrated': False, 'session_data': {}}, 'a new session sees %r' % answer)
    for opened in (s, fresh):
        link.close(opened, 1000)


def case_oversized_save_refused(link, ctx):
    s = link.open('ws', 'GET', '/ws', headers=WS_HEADERS)
    answer = ws_says(link, s, 'save "%s"' % ('x' * SESSION_DATA_MAX), 'the answer to an oversized save')
    expect(answer.startswith('refused: ') and str(SESSION_DATA_MAX) in answer,
           'the app got %r, not a clear error' % answer)
    expect(s.saved == [], 'the connector sent a save of %d bytes' % SESSION_DATA_MAX)
    # The session and the connector go on.
    link.ws_roundtrip(s, TEXT, b'still here', 'an echo after the refused save')
    link.close(s, 1000)


def case_tcp_hand_off(link, ctx):
    s = link.open('tcp', '', '', remote_ip='198.51.100.4')
    link.send_message(s, DATA, b'before\n')
    migrate(link, s)
    link.wait(lambda: s.handed or s.closed is not None, '`handed` on a TCP session')
    expect(bytes(s.body) == b'before\n', 'echoed %r before handing' % bytes(s.body))

# ---- end of session hand-off ----


def case_bad_frame_from_apm(link, ctx):
    # One byte over the limit: only the header is sent, so a connector that
    # does not check the length first waits for the rest and never exits.
    link.sock.sendall(struct.pack('>IBI', 5 + MAX_FRAME + 1, DATA, 1))
    status = link.child.wait_exit()
    expect(status is not None, 'still running %gs after a frame of %d bytes' % (TIMEOUT, 5 + MAX_FRAME + 1))
    expect(status == 1, 'exit status %d, not 1' % status)
    lines = link.child.stderr_lines()
    expect(lines, 'exited without saying why on stderr')
    return lines[-1]


def case_stdout_apart(link, ctx):
    out = link.child.output(link.child.stdout)
    expect(b'\x00' not in out, 'protocol bytes on stdout: %r' % out[:200])
    try:
        lines = out.decode('utf-8').splitlines()
    except UnicodeDecodeError:
        raise Fail('stdout is not text: %r' % out[:200])
    if not lines:
        return 'the app printed nothing'
    return 'the app printed %d lines; the answers parsed' % len(lines)


def no_ws_session():
    raise Fail('no WebSocket session (ws text echo failed)')


class Runner(object):
    def __init__(self):
        self.failed = 0

    def run(self, name, case, *args):
        link = args[0] if args and isinstance(args[0], Link) else None
        seen = len(link.violations) if link else 0
        try:
            note = case(*args)
            if link and len(link.violations) > seen:
                raise Fail('; '.join(link.violations[seen:]))
            print('ok %s%s' % (name, ' (%s)' % note if note else ''))
        except Fail as e:
            self.failed += 1
            print('FAIL %s: %s' % (name, e))
        except Exception:
            self.failed += 1
            print('FAIL %s: the harness broke: %s' % (name, traceback.format_exc().strip().replace('\n', '\n  ')))
        sys.stdout.flush()


def main():
    command = sys.argv[1:]
    if not command:
        sys.stderr.write('usage: conformance.py <command...>\n')
        return 2
    runner = Runner()
    started = time.monotonic()

    # The start-up checks run side by side: each is a process that must exit.
    no_apm = Child(command, apm=False, apm_fd=False)
    no_fd = Child(command, apm=True, apm_fd=False)
    mismatch = Child(command)
    runner.run('exits without APM', case_no_apm, no_apm)
    runner.run('exits without APM_FD', case_no_apm_fd, no_fd)
    runner.run('exits on a protocol mismatch', case_protocol_mismatch, mismatch)
    for child in (no_apm, no_fd, mismatch):
        child.kill()

    child = Child(command)
    link = Link(child)
    ctx = {}
    for name, case in [
        ('hello then ready', case_handshake),
        ('http request fields', case_http_request_fields),
        ('http malformed escapes kept as sent', case_http_malformed_escapes),
        ('http status 404', case_http_status),
        ('http two set-cookie values', case_http_cookies),
        ('http empty echo', case_http_echo_empty),
        ('http 3 MiB echo within credit', case_http_echo_flow_control),
        ('frames cut into 3-byte pieces', case_frames_in_pieces),
        ('20 concurrent sessions', case_concurrent_sessions),
        ('ws text echo', case_ws_text),
        ('ws binary echo', case_ws_binary),
        ('ws big messages in more fragments', case_ws_big_messages),
        ('ws raw', case_ws_raw),
        ('ws close 4000 bye', case_ws_close),
        ('tcp echo then quit', case_tcp),
        ('tcp half-close answered', case_tcp_half_close),
        ('sessions apm closed or never opened', case_apm_closes_sessions),
        ('ready lists the migrate feature', case_ready_lists_migrate),
        ('save then hand-off (migrate in 3-byte pieces)', case_save_then_hand_off),
        ('hand-off waits for writes queued for credit', case_hand_off_waits_for_queued_writes),
        ('a migrated open carries session_data', case_migrated_open_carries_session_data),
        ('an oversized save is refused in the app', case_oversized_save_refused),
        ('tcp hand-off', case_tcp_hand_off),
        ('exits on an oversized frame from apm', case_bad_frame_from_apm),
        ('stdout apart from the channel', case_stdout_apart),
    ]:
        if case in (case_ws_binary, case_ws_big_messages, case_ws_raw, case_ws_close) and 'ws' not in ctx:
            runner.run(name, no_ws_session)
            continue
        runner.run(name, case, link, ctx)
    if runner.failed:
        lines = child.stderr_lines()
        if lines:
            print('stderr of the child (last 40 lines):')
            for line in lines[-40:]:
                print('  | ' + line)
    child.kill()
    print('%d failed, %.1fs' % (runner.failed, time.monotonic() - started))
    return 1 if runner.failed else 0


if __name__ == '__main__':
    sys.exit(main())
