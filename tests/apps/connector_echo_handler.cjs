'use strict';
// The connector_echo test app (tests/apps/connector_echo.{js,mjs}): one
// behaviour for both entry points, so the CommonJS and ES module connectors
// are tested against the same code.
const fs = require('fs');

const ECHO_HEADERS = { 'x-status': '200', 'content-type': 'application/octet-stream' };

function http(session, lang) {
  const path = session.path;
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
