'use strict';
// The session hand-off test app (tests/it/sessions.rs), Node flavour; the
// Python one (session_counter.py) behaves the same.
//
// Each WebSocket message or TCP line is a counter that must follow the
// last one; the session keeps their running total in session_data, saved
// in apm after each, and answers "<n> <total> <pid>" (or "gap <last> <n>").
// "big" tries to save more session_data than apm keeps and answers with
// the error. HTTP answers "ok <pid>". With NEVER_READY set to a file that
// exists, the process never says ready (a replacement that never comes).
const fs = require('fs');
const ApmModule = require('../../connectors/apm_module.node.js');

if (process.env.NEVER_READY && fs.existsSync(process.env.NEVER_READY)) {
  setInterval(() => {}, 1000);
} else {
  new ApmModule((s) => {
    if (s.protocol === 'http') {
      s.write('ok ' + process.pid + '\n', { 'content-type': 'text/plain' });
      s.close();
      return;
    }
    if (!s.migrated) s.session_data = { last: 0, total: 0, rest: '' };
    const answer = (text) => s.write(s.protocol === 'tcp' ? text + '\n' : text);
    const take = (word) => {
      const d = s.session_data;
      if (word === 'big') {
        const kept = d.blob;
        d.blob = 'x'.repeat(100000);
        try {
          s.save_session_data();
          answer('big: saved');
        } catch (e) {
          answer('big: ' + e.message);
        }
        d.blob = kept;
        return;
      }
      const n = Number(word);
      if (n !== d.last + 1) {
        answer('gap ' + d.last + ' ' + word);
        return;
      }
      d.last = n;
      d.total += n;
      answer(n + ' ' + d.total + ' ' + process.pid);
    };
    s.onData = (data) => {
      const d = s.session_data;
      if (s.protocol === 'ws') {
        take(String(data));
      } else {
        const lines = (d.rest + data.toString('utf8')).split('\n');
        d.rest = lines.pop();
        lines.forEach(take);
      }
      s.save_session_data();
    };
  });
}
