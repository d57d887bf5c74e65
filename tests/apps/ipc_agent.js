'use strict';
// An IPC test agent on the Node connector, driven through its control
// channel `ctl.<AGENT>` (tests/it/ipc.rs); tests/apps/ipc_agent.py is the
// same agent in Python. Environment: AGENT (its name), REPLY_DELAY_MS (when
// set, it answers requests on its other channels after that long),
// ACCEPT_STREAMS (when set, it accepts stream offers).
const ApmModule = require('../../connectors/apm_module.node.js');

const name = process.env.AGENT;
const delay = process.env.REPLY_DELAY_MS;
const inbox = [];
let stream = null;

const apm = new ApmModule((session) => {
  session.write('agent ' + name);
  session.close();
});

function track(s) {
  stream = s;
  // Peers that joined before the app had the stream are in `peers`.
  for (const peer of s.peers) inbox.push({ ev: 'join', peer: peer });
  s.onData = (data, peer) => inbox.push({ ev: 'data', data: String(data), peer: peer === undefined ? null : peer });
  s.onClose = () => inbox.push({ ev: 'close' });
  s.onJoin = (peer) => inbox.push({ ev: 'join', peer: peer });
  s.onLeave = (peer) => inbox.push({ ev: 'leave', peer: peer });
}

const commands = {
  async send(c) {
    apm.send(c.channel, c.data);
    return 'sent';
  },
  async request(c) {
    const started = process.hrtime.bigint();
    const data = await apm.request(c.channel, c.data, c.timeout);
    return { data: data, ms: Number(process.hrtime.bigint() - started) / 1e6 };
  },
  async inbox() {
    return inbox.splice(0);
  },
  async open(c) {
    const s = await apm.requestStream(c.channel, c.head, c.timeout);
    if (s === null) return { ok: false };
    track(s);
    return { ok: true };
  },
  async write(c) {
    return stream !== null && stream.write(c.data);
  },
  async close() {
    if (stream !== null) stream.close();
    return 'closed';
  },
  async flood(c) {
    const payload = 'x'.repeat(c.size);
    for (let sent = 0; sent < c.count; sent += 1000) {
      for (let i = sent; i < Math.min(c.count, sent + 1000); i++) apm.send(c.channel, payload);
      await new Promise((resolve) => setImmediate(resolve));
    }
    return 'flooded';
  },
  async dash(c) {
    apm.setDashValue(c.id, c.value, c.color);
    apm.metric(c.metric, c.amount, c.type);
    return 'set';
  },
};

apm.onChannel = (channel, data, reply) => {
  if (channel === 'ctl.' + name) {
    return commands[data.do](data).then(reply, (e) => reply({ error: String(e) }));
  }
  inbox.push({ ev: 'msg', channel: channel, data: data });
  if (reply && delay !== undefined) setTimeout(() => reply({ from: name }), Number(delay));
  return undefined;
};

apm.onStream = (s) => {
  inbox.push({ ev: 'offer', peer: s.peerId, head: s.head });
  if (process.env.ACCEPT_STREAMS === undefined) return s.close();
  track(s.accept());
  return undefined;
};
