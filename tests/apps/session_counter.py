"""The session hand-off test app (tests/it/sessions.rs), Python flavour;
see session_counter.js, which behaves the same."""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'connectors'))

from apm_module import ApmModule  # noqa: E402


def serve(s):
    if s.protocol == 'http':
        s.write('ok %d\n' % os.getpid(), {'content-type': 'text/plain'})
        s.close()
        return
    if not s.migrated:
        s.session_data = {'last': 0, 'total': 0, 'rest': ''}

    def answer(text):
        s.write(text + '\n' if s.protocol == 'tcp' else text)

    def take(word):
        d = s.session_data
        if word == 'big':
            kept = d.get('blob')
            d['blob'] = 'x' * 100000
            try:
                s.save_session_data()
                answer('big: saved')
            except ValueError as e:
                answer('big: %s' % e)
            d['blob'] = kept
            return
        if not word.isdigit() or int(word) != d['last'] + 1:
            answer('gap %d %s' % (d['last'], word))
            return
        d['last'] = int(word)
        d['total'] += d['last']
        answer('%d %d %d' % (d['last'], d['total'], os.getpid()))

    def on_data(data, is_binary):
        d = s.session_data
        if s.protocol == 'ws':
            take(data if isinstance(data, str) else data.decode('utf-8'))
        else:
            lines = (d['rest'] + data.decode('utf-8')).split('\n')
            d['rest'] = lines.pop()
            for line in lines:
                take(line)
        s.save_session_data()

    s.on_data = on_data


if os.environ.get('NEVER_READY') and os.path.exists(os.environ['NEVER_READY']):
    while True:
        time.sleep(1)
ApmModule(serve).run()
