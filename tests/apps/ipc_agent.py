"""The IPC test agent of tests/apps/ipc_agent.js, in Python: the same
commands on its control channel `ctl.<AGENT>`, the same environment."""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'connectors'))

from apm_module import ApmModule  # noqa: E402

name = os.environ['AGENT']
delay = os.environ.get('REPLY_DELAY_MS')
inbox = []
state = {'stream': None}


def on_connect(s):
    s.write(b'agent ' + name.encode())
    s.close()


apm = ApmModule(on_connect)


def track(s):
    state['stream'] = s
    # Peers that joined before the app had the stream are in `peers`.
    inbox.extend({'ev': 'join', 'peer': peer} for peer in sorted(s.peers))
    s.on_data = lambda data, peer=None: inbox.append(
        {'ev': 'data', 'data': data if isinstance(data, str) else data.decode(), 'peer': peer})
    s.on_close = lambda: inbox.append({'ev': 'close'})
    s.on_join = lambda peer: inbox.append({'ev': 'join', 'peer': peer})
    s.on_leave = lambda peer: inbox.append({'ev': 'leave', 'peer': peer})


def request(c):
    started = time.monotonic()
    data = apm.request(c['channel'], c.get('data'), c.get('timeout'))
    return {'data': data, 'ms': (time.monotonic() - started) * 1000}


def take_inbox(_c):
    taken = list(inbox)
    del inbox[:]
    return taken


def open_stream(c):
    s = apm.request_stream(c['channel'], c.get('head'), c.get('timeout'))
    if s is None:
        return {'ok': False}
    track(s)
    return {'ok': True}


def close(_c):
    if state['stream'] is not None:
        state['stream'].close()
    return 'closed'


def send(c):
    apm.send(c['channel'], c.get('data'))
    return 'sent'


COMMANDS = {
    'send': send,
    'request': request,
    'inbox': take_inbox,
    'open': open_stream,
    'write': lambda c: state['stream'] is not None and state['stream'].write(c['data']),
    'close': close,
}


def on_channel(channel, data, reply):
    if channel == 'ctl.' + name:
        return COMMANDS[data['do']](data)
    inbox.append({'ev': 'msg', 'channel': channel, 'data': data})
    if reply is not None and delay is not None:
        # Said before the wait, so a test knows the request is pending here.
        print('agent %s: answering in %s ms' % (name, delay), flush=True)
        time.sleep(int(delay) / 1000)
        return {'from': name}
    return None


def on_stream(s):
    inbox.append({'ev': 'offer', 'peer': s.peer_id, 'head': s.head})
    if os.environ.get('ACCEPT_STREAMS') is None:
        s.close()
    else:
        track(s.accept())


apm.on_channel = on_channel
apm.on_stream = on_stream
apm.run()
