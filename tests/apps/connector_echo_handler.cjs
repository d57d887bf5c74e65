'use strict';
// The connector_echo test app (tests/apps/connector_echo.{js,mjs}): one
// behaviour for both entry points, so the CommonJS and ES module connectors
// are tested against the same code.
const fs = require('fs');

const ECHO_HEADERS = { 'x-status': '200', 'content-type': 'application/octet-stream' };

function http(session, lang) {
  const path = session.path;
  if (path === '/throw') throw new Error('connector_echo: thrown on purpose');
  if (path === '/bad-header') {
    session.write('no', { 'x-status': '200', 'x-bad': 'a\r\nb' }); // throws
    return;
  }
  if (path === '/echo') {
    let wrote = false;
    session.onData = (chunk) => {
      wrote = true;
      session.write(chunk, ECHO_HEADERS);
    };
    session.onEnd = () => {
      if (!wrote) session.write(Buffer.alloc(0), ECHO_HEADERS);
      session.close();
    };
    return;
  }
  const status = /^\/status\/([0-9]+)$/.exec(path);
  if (status) {
    session.write('status ' + status[1], { 'x-status': status[1], 'content-type': 'text/plain' });
    session.close();
    return;
  }
  if (path === '/cookies') {
    session.write('ok', { 'set-cookie': ['a=1', 'b=2'] });
    session.close();
    return;
  }
  if (path === '/corrupt') {
    // Behind the connector's back: a length no frame may have, then junk.
    fs.writeSync(Number(process.env.APM_FD), Buffer.from([0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4, 5]));
    return;
  }
  let bodyLength = 0;
  session.onData = (chunk) => {
    bodyLength += chunk.length;
  };
  session.onEnd = () => {
    const info = {
      lang: lang,
      method: session.method,
      path: session.path,
      path_array: session.path_array,
      query: session.query,
      query_object: session.query_object,
      headers: session.headers,
      cookies: session.cookies,
      remote_ip: session.remote_ip,
      session_id: session.session_id,
      instance_id: session.instance_id,
      client_subject: session.client_subject,
      tls: session.tls,
      pid: process.pid,
      body_length: bodyLength,
      env_index: process.env.APM_INDEX === undefined ? null : process.env.APM_INDEX,
    };
    session.write(JSON.stringify(info), { 'x-status': '200', 'content-type': 'application/json' });
    session.close();
  };
}

// ---- session hand-off: "save <json>" keeps it as session_data in apm,
// "data?" tells whether the session was migrated and what it carries ----
function handoff(session, text) {
  if (text.startsWith('save ')) {
    session.session_data = JSON.parse(text.slice(5));
    try {
      session.save_session_data();
      session.write('saved');
    } catch (e) {
      session.write('refused: ' + e.message);
    }
    return true;
  }
  if (text === 'data?') {
    session.write(JSON.stringify({ migrated: session.migrated, session_data: session.session_data }));
    return true;
  }
  return false;
}
// ---- end of session hand-off ----

function ws(session) {
  session.onData = (data, isBinary) => {
    if (!isBinary && handoff(session, data)) return;
    if (!isBinary && data === 'close') session.close(4000, 'bye');
    else if (!isBinary && data === 'throw') throw new Error('connector_echo: thrown on purpose');
    else if (!isBinary && data === 'raw') session.write_raw(Buffer.concat([Buffer.from([0x81, 0x04]), Buffer.from('raw!')]));
    else session.write(data); // a string goes back as text, a Buffer as binary
  };
  session.onClose = () => {};
}

function tcp(session) {
  session.onData = (data) => {
    session.write(data);
    if (data.length >= 5 && data.subarray(data.length - 5).toString('latin1') === 'quit\n') session.close();
  };
  // The client half-closed: it still gets the rest of the answer.
  session.onEnd = () => {
    session.write('bye\n');
    session.close();
  };
}

module.exports = function handle(session, lang) {
  if (session.protocol === 'ws') ws(session);
  else if (session.protocol === 'tcp') tcp(session);
  else http(session, lang);
};

// IPC (feature "ipc"): what tests/connectors/conformance.py expects of
// every connector. A request on channel `do` names an IPC call for the app
// to make, and its reply is that call's outcome; other requests are
// answered with what they carried, other messages sent back on `echo`;
// stream offers are accepted (declined when the head says "decline") and
// peers echo what they get; a mediated stream writes "hello" to its peers
// and echoes each peer's writes back to that peer.
module.exports.ipc = function ipc(apm) {
  const ops = {
    request: (d) => apm.request(d.channel, d.data, d.timeout),
    send: (d) => {
      apm.send(d.channel, d.data);
      return 'sent';
    },
    dash: (d) => {
      apm.setDashValue(d.id, d.value, d.color);
      apm.metric(d.name, d.amount, d.type);
      return 'set';
    },
    stream: async (d) => {
      const s = await apm.requestStream(d.channel, d.head);
      if (s === null) return 'refused';
      s.onData = (data, peer) => s.write(data, peer);
      s.write('hello');
      return 'opened';
    },
  };
  apm.onChannel = (channel, data, reply) => {
    if (!reply) return apm.send('echo', { channel: channel, data: data });
    if (channel === 'do') return ops[data.op](data);
    return { channel: channel, data: data };
  };
  apm.onStream = (s) => {
    if (s.head === 'decline') return s.close();
    s.accept();
    s.onData = (data) => s.write(data);
    return undefined;
  };
};
