#!/usr/bin/env python3
"""Connector conformance: plays apm's side of docs/connector-protocol.md
against any connector app that follows the connector_echo test app spec.

    python3 tests/connectors/conformance.py python3 tests/apps/connector_echo.py
    python3 tests/connectors/conformance.py node tests/apps/connector_echo.js
    python3 tests/connectors/conformance.py php tests/apps/connector_echo.php
    python3 tests/connectors/conformance.py perl tests/apps/connector_echo.pl
    python3 tests/connectors/conformance.py lua5.4 tests/apps/connector_echo.lua

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
# IPC (feature "ipc"): kinds 32-47.
(SEND, REQUEST, MESSAGE, REPLY, RESULT, STREAM_OPEN, STREAM_OFFER, STREAM_ACCEPT,
 STREAM_JOIN, STREAM_DATA, STREAM_CLOSE, DASH, METRIC) = range(32, 45)
IPC_FROM_CHILD = (SEND, REQUEST, REPLY, STREAM_OPEN, STREAM_ACCEPT, STREAM_DATA, STREAM_CLOSE, DASH, METRIC)

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

    def __init__(self, command, apm=True, apm_fd=True, env_extra=None):
        self.sock, theirs = socket.socketpair()
        self.stdout = tempfile.TemporaryFile()
        self.stderr = tempfile.TemporaryFile()
        env = dict((k, v) for k, v in os.environ.items() if not k.startswith('APM'))
        env.update(env_extra or {})
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
        self.ipc = []           # IPC frames from the child: (kind, id, payload)

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
        if kind in IPC_FROM_CHILD:
            # Kept for the Node and Python cases (self.ipc) and checked and
            # kept for the PHP, Perl and Lua ones (ipc_events).
            self.ipc.append((kind, session_id, payload))
            return polyglot_handle_ipc(self, kind, session_id, payload)
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


def case_channel_ends(child):
    link = Link(child)
    link.send(HELLO, 0, hello())
    link.wait(lambda: link.ready is not None, 'ready')
    # A request in flight: the answer's write meets a closed channel.
    link.http('GET', '/status/200')
    child.sock.close()
    status = child.wait_exit()
    expect(status is not None, 'still running %gs after apm closed the channel' % TIMEOUT)
    expect(status == 0, 'exit status %d, not 0' % status)


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
        link.finish(s, 'the echo of a request sent 3 bytes at a time')
        expect(s.status() == 200, 'status %r' % (s.status(),))
        expect(bytes(s.body) == body, 'the echo differs: %s' % differ(bytes(s.body), body))
        # Every other kind apm sends, also cut: open, text, data, end, close, credit.
        w = link.open('ws', 'GET', '/ws', headers=WS_HEADERS)
        link.ws_roundtrip(w, TEXT, u'pi\u00e8ces'.encode('utf-8'), 'the echo of a text message sent in pieces')
        link.ws_roundtrip(w, DATA, bytes(range(40)), 'the echo of a binary message sent in pieces')
        t = link.open('tcp', '', '', remote_ip='198.51.100.4')
        link.send_message(t, DATA, b'ping\n')
        link.send(END, t.id)
        link.finish(t, 'the answer to a half-close sent in pieces')
        expect(bytes(t.body) == b'ping\nbye\n', 'received %r' % bytes(t.body))
        link.close(w, 1000, 'done')
    finally:
        link.piece_size = None
    link.barrier()
    expect(link.dropped[w.id] == 0, 'answered on session %d after a close sent in pieces' % w.id)


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


def case_app_exceptions(link, ctx):
    # The app's bug ends its session, not the instance: a handler that
    # throws answers 500, a WebSocket callback that throws closes with 1011.
    s = link.finish(link.http('GET', '/throw'), 'the answer to a request whose handler throws')
    expect(s.status() == 500, 'status %r, not 500' % (s.status(),))
    w = link.open('ws', 'GET', '/ws', headers=WS_HEADERS)
    link.send_message(w, TEXT, b'throw')
    link.finish(w, 'the close of a WebSocket whose callback throws')
    expect(w.closed[0] == 1011, 'closed with %r, not 1011' % (w.closed,))
    # A header value with CR LF would end the instance for a protocol
    # error: the connector refuses it in the app's write, a 500 follows.
    h = link.finish(link.http('GET', '/bad-header'), 'the answer to a request that writes a bad header')
    expect(h.status() == 500, 'status %r, not 500' % (h.status(),))
    link.barrier()
    errors = [l for l in link.child.stderr_lines() if 'thrown on purpose' in l]
    expect(errors, 'stderr does not show the exception')


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




# ---- IPC for the PHP, Perl and Lua connectors (feature "ipc", frames 32-47) ----
# Run against connectors whose ready lists "ipc" and whose echo app is one
# of tests/apps/connector_echo.{php,pl,lua}, which answer IPC as follows:
#   onChannel(ch, data, reply): reply({lang, channel, echo: data}) when it
#     may, else send('echoed', {channel, echo: data});
#   onStream(s): declines a head with decline: true; else writes
#     'hello <channel>', echoes what it hears (leaves on 'leave') and says
#     send('stream-closed', <its peer id>) once the stream is over;
#   GET /ipc/request[?ms=N]: {"result": request('ask', {q: 1}, N)};
#   GET /ipc/send: send('news', {n: 1}); GET /ipc/dash:
#     setDashValue('load', 42.5, '#4f8cff') and metric('hits', 3, 'counter');
#   GET /ipc/stream: requestStream('feed', {from: lang}, 300): writes 'to all'
#     and bytes 00 01 to its first peer, answers {stream, peers}; then says
#     'welcome' to peers that join, 'got X' to a peer that writes X, closes on
#     'bye', and send('left', peer) when one leaves.

POLYGLOT_LANGS = ('php', 'perl', 'lua')
IPC_SEND, IPC_REQUEST, IPC_MESSAGE, IPC_REPLY, IPC_RESULT = 32, 33, 34, 35, 36
STREAM_OPEN, STREAM_OFFER, STREAM_ACCEPT, STREAM_JOIN, STREAM_DATA, STREAM_CLOSE = 37, 38, 39, 40, 41, 42
IPC_DASH, IPC_METRIC = 43, 44
NAMES.update({IPC_SEND: 'send', IPC_REQUEST: 'request', IPC_MESSAGE: 'message', IPC_REPLY: 'reply',
              IPC_RESULT: 'result', STREAM_OPEN: 'stream_open', STREAM_OFFER: 'stream_offer',
              STREAM_ACCEPT: 'stream_accept', STREAM_JOIN: 'stream_join', STREAM_DATA: 'stream_data',
              STREAM_CLOSE: 'stream_close', IPC_DASH: 'dash', IPC_METRIC: 'metric'})
POLYGLOT_IPC_FROM_CHILD = (IPC_SEND, IPC_REQUEST, IPC_REPLY, STREAM_OPEN, STREAM_ACCEPT, STREAM_DATA,
                           STREAM_CLOSE, IPC_DASH, IPC_METRIC)
IPC_JSON = (IPC_SEND, IPC_REQUEST, IPC_REPLY, STREAM_OPEN, IPC_DASH, IPC_METRIC)
OWN_ID_MAX = 0x7fffffff


def polyglot_handle_ipc(link, kind, ipc_id, payload):
    """Records what the child sent, decoded, in link.ipc_events."""
    name = NAMES[kind]
    if 'ipc' not in ((link.ready or {}).get('features') or []):
        return link.violation('%s from a connector whose ready does not list ipc' % name)
    if not hasattr(link, 'ipc_events'):
        link.ipc_events = []
    if kind in IPC_JSON:
        try:
            value = json.loads(payload.decode('utf-8'))
        except ValueError:
            return link.violation('%s is not JSON: %r' % (name, payload[:100]))
        if not isinstance(value, dict):
            return link.violation('%s is not a JSON object: %r' % (name, payload[:100]))
        if kind in (IPC_REQUEST, STREAM_OPEN) and not 1 <= ipc_id <= OWN_ID_MAX:
            link.violation('%s with id %#x, outside the child\'s ids' % (name, ipc_id))
        if kind in (IPC_SEND, IPC_DASH, IPC_METRIC) and ipc_id != 0:
            link.violation('%s with id %d, not 0' % (name, ipc_id))
    elif kind == STREAM_DATA:
        if len(payload) < 5:
            return link.violation('stream_data of %d bytes' % len(payload))
        value = (struct.unpack_from('>I', payload)[0], payload[4], payload[5:])
    elif kind == STREAM_CLOSE:
        if len(payload) != 4:
            return link.violation('stream_close of %d bytes' % len(payload))
        value = struct.unpack('>I', payload)[0]
    else:
        if payload:
            link.violation('stream_accept with a payload')
        value = None
    link.ipc_events.append((kind, ipc_id, value))


def ipc_take(link, kind, what, match=lambda ipc_id, value: True):
    """Waits for the child's next IPC frame of `kind` that matches; returns (id, value)."""
    def find():
        for i, (k, ipc_id, value) in enumerate(getattr(link, 'ipc_events', [])):
            if k == kind and match(ipc_id, value):
                return i
        return None
    link.wait(lambda: find() is not None, lambda: '%s (%s); the child sent %r' % (
        NAMES[kind], what, [(NAMES[k], i, v) for k, i, v in getattr(link, 'ipc_events', [])][-5:]))
    _, ipc_id, value = link.ipc_events.pop(find())
    return ipc_id, value


def ipc_send_json(link, kind, ipc_id, value):
    link.send(kind, ipc_id, json.dumps(value).encode('utf-8'))


def polyglot_ipc_offered(link, ctx):
    return 'ipc' in ((link.ready or {}).get('features') or []) and ctx.get('lang') in POLYGLOT_LANGS


def when_ipc(case):
    """The case, or a visible note for the connectors it does not cover."""
    def run(link, ctx):
        if not polyglot_ipc_offered(link, ctx):
            return 'not run: for the PHP, Perl and Lua connectors, whose ready lists ipc'
        link.ipc_events = []
        note = case(link, ctx)
        link.barrier()
        left = [(NAMES[k], i, v) for k, i, v in link.ipc_events]
        expect(not left, 'IPC frames nobody asked for: %r' % left[:5])
        return note
    return run


def case_ipc_messages(link, ctx):
    ipc_send_json(link, IPC_MESSAGE, 0, {'channel': 'news', 'data': {'a': [1, None, u'\u00e9']}})
    _, sent = ipc_take(link, IPC_SEND, 'the app\'s answer to a message sent to all')
    expect(sent == {'channel': 'echoed', 'data': {'channel': 'news', 'echo': {'a': [1, None, u'\u00e9']}}},
           'sent %r' % (sent,))
    ipc_send_json(link, IPC_MESSAGE, 0x80000001, {'channel': 'ask', 'data': [1, 2]})
    ipc_id, reply = ipc_take(link, IPC_REPLY, 'the reply to a request\'s message')
    expect(ipc_id == 0x80000001, 'the reply names %#x, not the message 0x80000001' % ipc_id)
    expect(reply == {'data': {'lang': ctx['lang'], 'channel': 'ask', 'echo': [1, 2]}}, 'replied %r' % (reply,))


def case_ipc_request_pumps_the_loop(link, ctx):
    s = link.http('GET', '/ipc/request')
    request_id, request = ipc_take(link, IPC_REQUEST, 'the request of GET /ipc/request')
    expect(request == {'channel': 'ask', 'data': {'q': 1}, 'timeout_ms': None}, 'the request is %r' % (request,))
    # While the app waits for the result, the connector serves the rest.
    other = link.finish(link.http('GET', '/status/201'), 'an answer while a request waits for its result')
    expect(other.status() == 201, 'status %r' % (other.status(),))
    ipc_send_json(link, IPC_MESSAGE, 0x80000002, {'channel': 'ask', 'data': 'meanwhile'})
    ipc_take(link, IPC_REPLY, 'a reply while a request waits for its result')
    expect(s.closed is None, 'GET /ipc/request was answered before its result came')
    ipc_send_json(link, IPC_RESULT, request_id, {'data': {'answer': 42}, 'status': 'reply'})
    link.finish(s, 'the answer once the result came')
    expect(json_answer(s) == {'result': {'answer': 42}}, 'answered %r' % (json_answer(s),))
    # A per-call timeout is passed on; every status but reply gives null.
    for status in ('timeout', 'no_listener', 'gone', 'limit'):
        t = link.http('GET', '/ipc/request', 'ms=50')
        request_id, request = ipc_take(link, IPC_REQUEST, 'the request of GET /ipc/request?ms=50')
        expect(request.get('timeout_ms') == 50, 'timeout_ms is %r, not 50' % (request.get('timeout_ms'),))
        ipc_send_json(link, IPC_RESULT, request_id, {'data': 'ignored', 'status': status})
        link.finish(t, 'the answer after a result with status %s' % status)
        expect(json_answer(t) == {'result': None}, 'status %s gave %r' % (status, json_answer(t)))


def case_ipc_send_dash_metric(link, ctx):
    link.finish(link.http('GET', '/ipc/send'), 'the answer to GET /ipc/send')
    _, sent = ipc_take(link, IPC_SEND, 'send from a request')
    expect(sent == {'channel': 'news', 'data': {'n': 1}}, 'sent %r' % (sent,))
    link.finish(link.http('GET', '/ipc/dash'), 'the answer to GET /ipc/dash')
    _, dash = ipc_take(link, IPC_DASH, 'setDashValue')
    expect(dash == {'id': 'load', 'value': 42.5, 'color': '#4f8cff'}, 'dash %r' % (dash,))
    _, metric = ipc_take(link, IPC_METRIC, 'metric')
    expect(metric == {'name': 'hits', 'value': 3, 'type': 'counter'}, 'metric %r' % (metric,))


def case_ipc_stream_mediator(link, ctx):
    s = link.http('GET', '/ipc/stream')
    stream_id, opened = ipc_take(link, STREAM_OPEN, 'the stream_open of GET /ipc/stream')
    expect(opened == {'channel': 'feed', 'head': {'from': ctx['lang']}, 'timeout_ms': 300}, 'stream_open %r' % (opened,))
    first, second = 0x80000010, 0x80000011
    link.send(STREAM_JOIN, stream_id, struct.pack('>I', first))
    link.finish(s, 'the answer once a peer joined')
    expect(json_answer(s) == {'stream': 'feed', 'peers': [first]}, 'answered %r' % (json_answer(s),))
    is_stream = lambda i, v: i == stream_id
    _, to_all = ipc_take(link, STREAM_DATA, 'a write to every peer', is_stream)
    expect(to_all == (0, 1, b'to all'), 'stream_data %r' % (to_all,))
    _, to_one = ipc_take(link, STREAM_DATA, 'a binary write to one peer', is_stream)
    expect(to_one == (first, 0, b'\x00\x01'), 'stream_data %r' % (to_one,))
    link.send(STREAM_JOIN, stream_id, struct.pack('>I', second))
    _, welcome = ipc_take(link, STREAM_DATA, 'the welcome of a peer that joined later', is_stream)
    expect(welcome == (second, 1, b'welcome'), 'stream_data %r' % (welcome,))
    link.send(STREAM_DATA, stream_id, struct.pack('>IB', first, 1) + u'pi\u00f1g'.encode('utf-8'))
    _, got = ipc_take(link, STREAM_DATA, 'the answer to what a peer wrote', is_stream)
    expect(got == (first, 1, u'got pi\u00f1g'.encode('utf-8')), 'stream_data %r' % (got,))
    link.send(STREAM_CLOSE, stream_id, struct.pack('>I', second))
    _, left = ipc_take(link, IPC_SEND, 'the app hearing that a peer left')
    expect(left == {'channel': 'left', 'data': second}, 'sent %r' % (left,))
    link.send(STREAM_DATA, stream_id, struct.pack('>IB', first, 1) + b'bye')
    _, closed = ipc_take(link, STREAM_CLOSE, 'the mediator closing its stream', is_stream)
    expect(closed == 0, 'stream_close names peer %#x, not 0' % closed)
    # Frames for the stream after its close cross on the wire: dropped.
    link.send(STREAM_DATA, stream_id, struct.pack('>IB', first, 1) + b'late')


def case_ipc_stream_refused(link, ctx):
    s = link.http('GET', '/ipc/stream')
    stream_id, _ = ipc_take(link, STREAM_OPEN, 'the stream_open of GET /ipc/stream')
    link.send(STREAM_CLOSE, stream_id, struct.pack('>I', 0))
    link.finish(s, 'the answer once the stream was refused')
    expect(json_answer(s) == {'stream': None}, 'answered %r' % (json_answer(s),))


def case_ipc_stream_peer(link, ctx):
    peer = 0x80000020
    ipc_send_json(link, STREAM_OFFER, peer, {'channel': 'feed', 'head': {'x': 1}, 'peer': peer})
    # The greeting onStream wrote comes after the accept, or apm drops it.
    link.wait(lambda: [(k, i) for k, i, _ in link.ipc_events][:2] == [(STREAM_ACCEPT, peer), (STREAM_DATA, peer)],
              lambda: 'stream_accept, then the greeting; the child sent %r' % (link.ipc_events[:3],))
    ipc_take(link, STREAM_ACCEPT, 'the accept of an offer')
    _, hello = ipc_take(link, STREAM_DATA, 'the greeting of the peer')
    expect(hello == (0, 1, b'hello feed'), 'stream_data %r' % (hello,))
    link.send(STREAM_DATA, peer, struct.pack('>IB', peer, 0) + b'\xff\xfe')
    _, echo = ipc_take(link, STREAM_DATA, 'the echo of bytes', lambda i, v: i == peer)
    expect(echo == (0, 0, b'\xff\xfe'), 'stream_data %r' % (echo,))
    link.send(STREAM_CLOSE, peer, struct.pack('>I', 0))
    _, closed = ipc_take(link, IPC_SEND, 'the app hearing that the stream is over')
    expect(closed == {'channel': 'stream-closed', 'data': peer}, 'sent %r' % (closed,))
    # A peer declines in onStream, or leaves later.
    declined = 0x80000021
    ipc_send_json(link, STREAM_OFFER, declined, {'channel': 'feed', 'head': {'decline': True}, 'peer': declined})
    ipc_take(link, STREAM_CLOSE, 'the decline of an offer', lambda i, v: i == declined)
    leaving = 0x80000022
    ipc_send_json(link, STREAM_OFFER, leaving, {'channel': 'feed', 'head': None, 'peer': leaving})
    ipc_take(link, STREAM_ACCEPT, 'the accept of an offer', lambda i, v: i == leaving)
    ipc_take(link, STREAM_DATA, 'the greeting of the peer', lambda i, v: i == leaving)
    link.send(STREAM_DATA, leaving, struct.pack('>IB', leaving, 1) + b'leave')
    ipc_take(link, STREAM_CLOSE, 'the peer leaving', lambda i, v: i == leaving)


def case_ipc_request_from_the_main_chunk(child):
    # CONNECTOR_ECHO_BOOT=1: before run(), the app asks request('boot',
    # {lang}) and says send('booted', <the reply>); the connector says ready
    # first, and waits for the result with no callback to yield.
    link = Link(child)
    link.send(HELLO, 0, hello())
    link.wait(lambda: link.ready is not None, 'ready')
    lang = str(link.ready.get('connector', '')).split(' ')[0]
    if lang not in POLYGLOT_LANGS:
        return 'not run: for the PHP, Perl and Lua connectors'
    request_id, request = ipc_take(link, IPC_REQUEST, 'the request of the main chunk')
    expect(request == {'channel': 'boot', 'data': {'lang': lang}, 'timeout_ms': None}, 'the request is %r' % (request,))
    ipc_send_json(link, IPC_RESULT, request_id, {'data': {'x': [1]}, 'status': 'reply'})
    _, sent = ipc_take(link, IPC_SEND, 'the send after the result')
    expect(sent == {'channel': 'booted', 'data': {'x': [1]}}, 'sent %r' % (sent,))
    link.barrier()
    expect(not link.violations, '; '.join(link.violations))


POLYGLOT_IPC_CASES = [
    ('ipc: messages, sent to all or answered', when_ipc(case_ipc_messages)),
    ('ipc: a request waits for its result and pumps the loop', when_ipc(case_ipc_request_pumps_the_loop)),
    ('ipc: send, dashboard value and metric', when_ipc(case_ipc_send_dash_metric)),
    ('ipc: a stream as its mediator', when_ipc(case_ipc_stream_mediator)),
    ('ipc: a stream refused', when_ipc(case_ipc_stream_refused)),
    ('ipc: a stream as a peer', when_ipc(case_ipc_stream_peer)),
]
# ---- end of IPC for the PHP, Perl and Lua connectors ----


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


# IPC (feature "ipc"): the app behaves as connector_echo_handler.cjs says.

MESSAGE_ID = 0x80000001
PEER_ID = 0x80000009


def ipc_frame(link, kind, what, where=lambda f: True):
    """The next IPC frame of that kind from the child, taken off the list."""
    found = []

    def arrived():
        for f in link.ipc:
            if f[0] == kind and where(f):
                found.append(f)
                link.ipc.remove(f)
                return True
        return False
    link.wait(arrived, what)
    return found[0]


def ipc_json(f, what):
    try:
        return json.loads(f[2].decode('utf-8'))
    except ValueError:
        raise Fail('%s is not JSON: %r' % (what, f[2][:100]))


def ask(link, data, message_id=MESSAGE_ID, channel='do'):
    link.send(MESSAGE, message_id, json.dumps({'channel': channel, 'data': data}).encode())


def replied(link, message_id=MESSAGE_ID):
    f = ipc_frame(link, REPLY, 'the reply to message %#x' % message_id, lambda f: f[1] == message_id)
    return ipc_json(f, 'reply').get('data')


def node_and_python(case):
    """The case for the Node and Python echo apps, whose IPC behaviour
    (connector_echo_handler.cjs) the PHP, Perl and Lua ones do not share:
    theirs is checked by the cases above."""
    def run(link, ctx):
        if ctx.get('lang') in POLYGLOT_LANGS:
            return 'not run: for the Node and Python connectors'
        return case(link, ctx)
    return run


def case_ipc_ready(link, ctx):
    link.wait(lambda: link.ready is not None, 'ready')
    expect('ipc' in (link.ready.get('features') or []), 'ready lists no "ipc" feature: %r' % link.ready)


def case_ipc_request_and_result(link, ctx):
    ask(link, {'op': 'request', 'channel': 'q', 'data': [1, 'two'], 'timeout': 250})
    f = ipc_frame(link, REQUEST, 'the app\'s request')
    expect(0 < f[1] < 0x80000000, 'a request id of %#x' % f[1])
    body = ipc_json(f, 'request')
    expect(body == {'channel': 'q', 'data': [1, 'two'], 'timeout_ms': 250}, 'request %r' % body)
    link.send(RESULT, f[1], json.dumps({'data': {'x': 1}, 'status': 'reply'}).encode())
    got = replied(link)
    expect(got == {'x': 1}, 'the app got %r, not the reply' % got)


def case_ipc_null_results(link, ctx):
    for status in ('timeout', 'no_listener', 'gone'):
        ask(link, {'op': 'request', 'channel': 'q', 'data': None})
        f = ipc_frame(link, REQUEST, 'the app\'s request')
        expect(ipc_json(f, 'request').get('timeout_ms') is None, 'timeout_ms without a timeout: %r' % f[2])
        link.send(RESULT, f[1], json.dumps({'data': None, 'status': status}).encode())
        got = replied(link)
        expect(got is None, '%s gave %r, not null' % (status, got))


def case_ipc_answers_requests_and_echoes_sends(link, ctx):
    ask(link, {'k': 'v'}, message_id=MESSAGE_ID + 1, channel='jobs')
    got = replied(link, MESSAGE_ID + 1)
    expect(got == {'channel': 'jobs', 'data': {'k': 'v'}}, 'the reply carried %r' % got)
    ask(link, 'news!', message_id=0, channel='news')
    f = ipc_frame(link, SEND, 'the echo of a send')
    expect(f[1] == 0, 'a send with id %#x' % f[1])
    body = ipc_json(f, 'send')
    expect(body == {'channel': 'echo', 'data': {'channel': 'news', 'data': 'news!'}}, 'send %r' % body)
    ask(link, {'op': 'send', 'channel': 'out', 'data': 3})
    body = ipc_json(ipc_frame(link, SEND, 'the app\'s send'), 'send')
    expect(body == {'channel': 'out', 'data': 3}, 'send %r' % body)
    expect(replied(link) == 'sent', 'the send op was not answered')


def case_ipc_dash_and_metric(link, ctx):
    ask(link, {'op': 'dash', 'id': 1, 'value': 42.5, 'color': '#4f8cff',
               'name': 'app.requests', 'amount': 2, 'type': 'counter'})
    dash = ipc_json(ipc_frame(link, DASH, 'setDashValue'), 'dash')
    expect(dash == {'id': 1, 'value': 42.5, 'color': '#4f8cff'}, 'dash %r' % dash)
    metric = ipc_json(ipc_frame(link, METRIC, 'metric'), 'metric')
    expect(metric == {'name': 'app.requests', 'value': 2, 'type': 'counter'}, 'metric %r' % metric)
    expect(replied(link) == 'set', 'the dash op was not answered')


def case_ipc_mediator(link, ctx):
    ask(link, {'op': 'stream', 'channel': 'room', 'head': {'h': 1}})
    f = ipc_frame(link, STREAM_OPEN, 'requestStream')
    stream = f[1]
    body = ipc_json(f, 'stream_open')
    expect(body.get('channel') == 'room' and body.get('head') == {'h': 1}, 'stream_open %r' % body)
    link.send(STREAM_JOIN, stream, struct.pack('>I', PEER_ID))
    f = ipc_frame(link, STREAM_DATA, 'the write to every peer')
    expect(f[1] == stream and f[2] == b'\0\0\0\0\x01hello', 'stream_data %r on %#x' % (f[2], f[1]))
    expect(replied(link) == 'opened', 'requestStream did not give a stream')
    link.send(STREAM_DATA, stream, struct.pack('>IB', PEER_ID, 0) + b'\xffbytes')
    f = ipc_frame(link, STREAM_DATA, 'the echo to that peer')
    expect(f[2] == struct.pack('>IB', PEER_ID, 0) + b'\xffbytes', 'the echo was %r' % f[2])
    link.send(STREAM_CLOSE, stream, struct.pack('>I', PEER_ID))
    link.send(STREAM_CLOSE, stream, b'\0\0\0\0')
    ask(link, {'op': 'stream', 'channel': 'room'})
    refused = ipc_frame(link, STREAM_OPEN, 'requestStream')
    link.send(STREAM_CLOSE, refused[1], b'\0\0\0\0')
    expect(replied(link) == 'refused', 'a refused stream did not give null')


def case_ipc_peer(link, ctx):
    offer = json.dumps({'channel': 'room', 'head': 'hi', 'peer': PEER_ID}).encode()
    link.send(STREAM_OFFER, PEER_ID, offer)
    ipc_frame(link, STREAM_ACCEPT, 'the accept', lambda f: f[1] == PEER_ID)
    link.send(STREAM_DATA, PEER_ID, struct.pack('>IB', PEER_ID, 1) + 'hé'.encode())
    f = ipc_frame(link, STREAM_DATA, 'the peer\'s echo')
    expect(f[1] == PEER_ID and f[2] == b'\0\0\0\0\x01' + 'hé'.encode(), 'the echo was %r' % f[2])
    link.send(STREAM_CLOSE, PEER_ID, b'\0\0\0\0')
    declined = PEER_ID + 1
    link.send(STREAM_OFFER, declined, json.dumps({'channel': 'room', 'head': 'decline', 'peer': declined}).encode())
    f = ipc_frame(link, STREAM_CLOSE, 'the decline', lambda f: f[1] == declined)
    expect(f[2] == b'\0\0\0\0', 'a decline of %r' % f[2])


def case_ipc_in_pieces(link, ctx):
    link.piece_size = 3
    try:
        case_ipc_request_and_result(link, ctx)
        case_ipc_peer(link, ctx)
    finally:
        link.piece_size = None


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
    ends = Child(command)
    boot = Child(command, env_extra={'CONNECTOR_ECHO_BOOT': '1'})
    runner.run('exits without APM', case_no_apm, no_apm)
    runner.run('exits without APM_FD', case_no_apm_fd, no_fd)
    runner.run('exits on a protocol mismatch', case_protocol_mismatch, mismatch)
    runner.run('exits with 0 when the channel ends', case_channel_ends, ends)
    runner.run('ipc: a request from the main chunk, before run()', case_ipc_request_from_the_main_chunk, boot)
    for child in (no_apm, no_fd, mismatch, ends, boot):
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
        ('app exceptions answer 500 and close 1011', case_app_exceptions),
        ('ready lists the migrate feature', case_ready_lists_migrate),
        ('save then hand-off (migrate in 3-byte pieces)', case_save_then_hand_off),
        ('hand-off waits for writes queued for credit', case_hand_off_waits_for_queued_writes),
        ('a migrated open carries session_data', case_migrated_open_carries_session_data),
        ('an oversized save is refused in the app', case_oversized_save_refused),
        ('tcp hand-off', case_tcp_hand_off),
    ] + POLYGLOT_IPC_CASES + [(name, node_and_python(case)) for name, case in [
        ('ipc: ready lists the feature', case_ipc_ready),
        ('ipc: request and its result', case_ipc_request_and_result),
        ('ipc: null results', case_ipc_null_results),
        ('ipc: requests answered, sends echoed', case_ipc_answers_requests_and_echoes_sends),
        ('ipc: setDashValue and metric', case_ipc_dash_and_metric),
        ('ipc: a mediated stream', case_ipc_mediator),
        ('ipc: a peer accepts, echoes, declines', case_ipc_peer),
        ('ipc: frames cut into 3-byte pieces', case_ipc_in_pieces),
    ]] + [
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
