"""The shared connector test app ("connector_echo"), Python flavour.

Same behaviour in every language; see tests/connectors/conformance.py,
which drives it as apm's daemon would.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'connectors'))

from apm_module import ApmModule  # noqa: E402


def serve_http(s):
    # A line per request on stdout: it must reach the log, not the channel.
    print('connector_echo: %s %s' % (s.method, s.path), flush=True)
    s.session_data['body_length'] = 0

    if s.path == '/throw':
        raise RuntimeError('connector_echo: thrown on purpose')

    if s.path == '/bad-header':
        s.write('no', {'x-status': '200', 'x-bad': 'a\r\nb'})  # raises
        return

    if s.path == '/corrupt':
        # Bypasses the connector: a length far beyond max_frame. The
        # connector moved the channel off fd 3, so use the descriptor it holds.
        os.write(apm._sock.fileno(), b'\xff\xff\xff\xff' + b'junk!')
        return

    if s.path == '/stuck':
        # Stops the whole connector: the channel is no longer read.
        time.sleep(3600)
        return

    if s.path == '/echo':
        headers = {'x-status': '200', 'content-type': 'application/octet-stream'}

        def echo(chunk, is_binary):
            s.write(chunk, headers)

        def done():
            s.write(b'', headers)  # sends the head if the body was empty
            s.close()

        s.on_data = echo
        s.on_end = done
        return

    def count(chunk, is_binary):
        s.session_data['body_length'] += len(chunk)

    def answer():
        if s.path.startswith('/status/'):
            status = s.path[len('/status/'):]
            s.write('status %s' % status, {'x-status': status, 'content-type': 'text/plain'})
        elif s.path == '/cookies':
            s.write('ok', {'x-status': '200', 'content-type': 'text/plain', 'set-cookie': ['a=1', 'b=2']})
        else:
            s.write(json.dumps({
                'lang': 'python',
                'method': s.method,
                'path': s.path,
                'path_array': s.path_array,
                'query': s.query,
                'query_object': s.query_object,
                'headers': s.headers,
                'cookies': s.cookies,
                'remote_ip': s.remote_ip,
                'session_id': s.session_id,
                'instance_id': s.instance_id,
                'client_subject': s.client_subject,
                'tls': s.tls,
                'pid': os.getpid(),
                'body_length': s.session_data['body_length'],
                'env_index': os.environ.get('APM_INDEX'),
            }), {'x-status': '200', 'content-type': 'application/json'})
        s.close()

    s.on_data = count
    s.on_end = answer


# ---- session hand-off: "save <json>" keeps it as session_data in apm,
# "data?" tells whether the session was migrated and what it carries ----
def handoff(s, text):
    if text.startswith('save '):
        s.session_data = json.loads(text[5:])
        try:
            s.save_session_data()
            s.write('saved')
        except ValueError as e:
            s.write('refused: %s' % e)
        return True
    if text == 'data?':
        s.write(json.dumps({'migrated': s.migrated, 'session_data': s.session_data}))
        return True
    return False
# ---- end of session hand-off ----


def serve_ws(s):
    def on_data(data, is_binary):
        if not is_binary and handoff(s, data):
            return
        if not is_binary and data == 'close':
            s.close(4000, 'bye')
        elif not is_binary and data == 'throw':
            raise RuntimeError('connector_echo: thrown on purpose')
        elif not is_binary and data == 'raw':
            s.write_raw(bytes([0x81, 0x04]) + b'raw!')
        else:
            s.write(data)  # str goes back as text, bytes as binary

    s.on_data = on_data
    s.on_close = lambda code, reason: None


def serve_tcp(s):
    def on_data(data, is_binary):
        s.write(data)
        if data.endswith(b'quit\n'):
            s.close()

    def on_end():
        # The client half-closed: it still gets the rest of the answer.
        s.write(b'bye\n')
        s.close()

    s.on_data = on_data
    s.on_end = on_end


def on_connect(s):
    if s.protocol == 'ws':
        serve_ws(s)
    elif s.protocol == 'tcp':
        serve_tcp(s)
    else:
        serve_http(s)


# IPC (feature "ipc"): the behaviour connector_echo_handler.cjs describes.

def ipc_stream(d):
    s = apm.request_stream(d['channel'], d.get('head'))
    if s is None:
        return 'refused'
    s.on_data = lambda data, peer: s.write(data, peer)
    s.write('hello')
    return 'opened'


def ipc_dash(d):
    apm.set_dash_value(d['id'], d['value'], d.get('color'))
    apm.metric(d['name'], d['amount'], d['type'])
    return 'set'


def ipc_send(d):
    apm.send(d['channel'], d.get('data'))
    return 'sent'


IPC_OPS = {
    'request': lambda d: apm.request(d['channel'], d.get('data'), d.get('timeout')),
    'send': ipc_send,
    'dash': ipc_dash,
    'stream': ipc_stream,
}


def on_channel(channel, data, reply):
    if reply is None:
        apm.send('echo', {'channel': channel, 'data': data})
    elif channel == 'do':
        # A null outcome is answered too (the callback's None would not be).
        reply(IPC_OPS[data['op']](data))
    else:
        reply({'channel': channel, 'data': data})


def on_stream(s):
    if s.head == 'decline':
        s.close()
        return
    s.accept()
    s.on_data = lambda data: s.write(data)


apm = ApmModule(on_connect)
apm.on_channel = on_channel
apm.on_stream = on_stream
apm.run()
