'use strict';
// ---- prologue: CommonJS (gen-esm.js turns these require lines into imports) ----
const net = require('net');
// ---- shared body: apm_module.node.mjs is generated from this file ----
/*
 * apm connector for Node.js 14+: one drop-in file, node core modules only.
 *
 *   const ApmModule = require('./apm_module.node.js')   // CommonJS
 *   import ApmModule from './apm_module.node.mjs'       // ES module
 *
 *   const apm = new ApmModule(async (session) => {
 *       session.write('Hello World', { 'content-type': 'text/plain', 'x-status': '200' })
 *       session.close()
 *   })
 *
 * It speaks version 1 of the connector protocol (docs/connector-protocol.md)
 * on the descriptor apm names in APM_FD. The two files share everything
 * between the shared-body markers: edit apm_module.node.js, then run
 * `node connectors/gen-esm.js` to regenerate apm_module.node.mjs.
 */

const PROTOCOL = 1;

const K_HELLO = 1;
const K_READY = 2;
const K_OPEN = 16;
const K_DATA = 17;
const K_TEXT = 18;
const K_MORE = 19;
const K_END = 20;
const K_HEAD = 21;
const K_RAW = 22;
const K_CLOSE = 23;
const K_CREDIT = 24;
// ---- session hand-off (feature "migrate", kinds 48–55) ----
const K_SAVE = 48;
const K_MIGRATE = 49;
const K_HANDED = 50;
// What a save may carry until hello says (session_data_max).
const DEFAULT_SESSION_DATA_MAX = 65536;
// ---- end of session hand-off ----

// The hello frame itself has to be bounded before it announces max_frame.
const DEFAULT_MAX_FRAME = 1048576;
// The protocol caps a WebSocket message at 16 MiB; refusing a larger write
// fails one call instead of having the daemon kill the instance.
const MAX_MESSAGE = 16 * 1048576;
// A WebSocket close reason longer than this cannot go in a close frame.
const MAX_CLOSE_REASON = 123;
const EMPTY = Buffer.alloc(0);
// Frames of one tick adding up to at most this are written as one buffer.
const COALESCE_BYTES = 65536;

// A second reader on the descriptor would steal frames from the first.
let constructed = false;

function die(message) {
  process.stderr.write('apm_module: ' + message + '\n');
  process.exit(1);
}

function describe(err) {
  return err && err.stack ? err.stack : String(err);
}

function isPlainObject(v) {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function u32(n) {
  const b = Buffer.allocUnsafe(4);
  b.writeUInt32BE(n, 0);
  return b;
}

function decode(s) {
  try {
    return decodeURIComponent(s);
  } catch (e) {
    return s; // a malformed escape is the client's problem, not a reason to fail the request
  }
}

// defineProperty so that a key named __proto__ is stored, not interpreted.
function setOwn(obj, key, value) {
  Object.defineProperty(obj, key, { value: value, enumerable: true, writable: true, configurable: true });
}

function splitPath(path) {
  // Split before decoding so that an encoded slash stays inside its segment.
  return path.split('/').filter((seg) => seg !== '').map(decode);
}

// Like node's querystring: a repeated key collects its values in an array.
function parseQuery(query) {
  const out = {};
  if (query === '') return out;
  for (const pair of query.split('&')) {
    if (pair === '') continue;
    const eq = pair.indexOf('=');
    const key = decode((eq < 0 ? pair : pair.slice(0, eq)).replace(/\+/g, ' '));
    const value = eq < 0 ? '' : decode(pair.slice(eq + 1).replace(/\+/g, ' '));
    if (!Object.prototype.hasOwnProperty.call(out, key)) setOwn(out, key, value);
    else if (Array.isArray(out[key])) out[key].push(value);
    else out[key] = [out[key], value];
  }
  return out;
}

// The first occurrence of a name wins, as browsers send the most specific cookie first.
function parseCookies(header) {
  const out = {};
  for (const part of header.split(';')) {
    const eq = part.indexOf('=');
    if (eq < 0) continue;
    const name = part.slice(0, eq).trim();
    if (name === '' || Object.prototype.hasOwnProperty.call(out, name)) continue;
    let value = part.slice(eq + 1).trim();
    if (value.length >= 2 && value[0] === '"' && value[value.length - 1] === '"') value = value.slice(1, -1);
    setOwn(out, name, decode(value));
  }
  return out;
}

function toBuffer(data, what) {
  if (typeof data === 'string') return Buffer.from(data, 'utf8');
  if (Buffer.isBuffer(data)) return data;
  if (data === undefined || data === null) return EMPTY;
  if (ArrayBuffer.isView(data)) return Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  if (data instanceof ArrayBuffer) return Buffer.from(data);
  throw new TypeError(what + ' takes a string or a Buffer, not ' + typeof data);
}

const HEADER_NAME = /^[!#$%&'*+\-.^_`|~0-9a-z]+$/;

function headerValue(name, v) {
  if (typeof v !== 'string' && typeof v !== 'number' && typeof v !== 'boolean') {
    throw new TypeError('header ' + name + ': a value must be a string or an array of strings');
  }
  const s = String(v);
  // The daemon treats a malformed head as a broken connector and kills the
  // instance; refusing here fails one request instead.
  if (/[\r\n\0]/.test(s)) throw new TypeError('header ' + name + ': a value may not contain CR, LF or NUL');
  return s;
}

function encodeHead(headers, maxFrame) {
  if (!isPlainObject(headers)) throw new TypeError('write(data, headers): headers must be an object');
  // A Map, not an object: any name is a plain key, and JSON.stringify of an
  // object without a prototype measured 40 % slower than this.
  const out = new Map();
  for (const rawName of Object.keys(headers)) {
    const v = headers[rawName];
    if (v === undefined || v === null) continue;
    const name = rawName.toLowerCase();
    if (!HEADER_NAME.test(name)) throw new TypeError('invalid header name: ' + JSON.stringify(rawName));
    const value = Array.isArray(v) ? v.map((x) => headerValue(name, x)) : headerValue(name, v);
    const prev = out.get(name);
    // Set-Cookie and set-cookie are one header.
    out.set(name, prev === undefined ? value : (Array.isArray(prev) ? prev : [prev]).concat(value));
  }
  const status = out.get('x-status');
  if (status !== undefined && (Array.isArray(status) || !/^[1-9][0-9][0-9]$/.test(status))) {
    throw new TypeError('x-status must be a three-digit HTTP status, not ' + JSON.stringify(status));
  }
  // A name passed HEADER_NAME, so it needs no escaping.
  let json = '{';
  out.forEach((value, name) => {
    json += (json.length > 1 ? ',"' : '"') + name + '":' + JSON.stringify(value);
  });
  json += '}';
  // A UTF-16 unit takes at most 3 bytes: the exact length only when it may matter.
  if (json.length * 3 > maxFrame && Buffer.byteLength(json) > maxFrame) {
    throw new RangeError('the response headers do not fit in one frame');
  }
  return json;
}

function closePayload(code, reason) {
  let r = Buffer.from(reason === undefined || reason === null ? '' : String(reason), 'utf8');
  if (r.length > MAX_CLOSE_REASON) {
    let end = MAX_CLOSE_REASON;
    while (end > 0 && (r[end] & 0xc0) === 0x80) end--; // do not cut a character in half
    r = r.subarray(0, end);
  }
  const b = Buffer.allocUnsafe(2 + r.length);
  b.writeUInt16BE(code, 0);
  r.copy(b, 2);
  return b;
}

function checkCallback(fn, name) {
  if (fn !== undefined && fn !== null && typeof fn !== 'function') {
    throw new TypeError('session.' + name + ' must be a function');
  }
  return fn || null;
}

class SessionState {
  constructor(link, id) {
    this.link = link;
    this.id = id;
    this.sendCredit = link.window;
    this.recvCredit = link.window;
    this.out = []; // frames waiting for credit, in order
    this.events = []; // data and end waiting for the app's callbacks
    this.frags = []; // leading fragments (more) of the next message
    this.fragBytes = 0;
    this.handlerPending = true;
    this.busy = false; // a callback's Promise has not settled yet
    this.pumping = false;
    this.pumpScheduled = false;
    this.headSent = false;
    this.closing = false; // the app closed, or the session ended
    this.onData = null;
    this.onEnd = null;
    this.onClose = null;
    this.parsed = null;
    this.migrating = false; // apm asked for the session to be handed over
  }

  cached(name, parse) {
    if (this.parsed === null) this.parsed = {};
    if (!(name in this.parsed)) this.parsed[name] = parse();
    return this.parsed[name];
  }
}

class ApmSession {
  // Private, so that logging or JSON.stringify(session) shows the request
  // only; a private field costs what a plain one does, where
  // Object.defineProperty in a constructor measured ~4 % of the connector's CPU.
  #state;

  constructor(link, id, head) {
    const headers = isPlainObject(head.headers) ? head.headers : {};
    const path = typeof head.path === 'string' ? head.path : '';
    const query = typeof head.query === 'string' ? head.query : '';
    this.protocol = head.protocol;
    this.method = typeof head.method === 'string' ? head.method : '';
    this.path = path;
    this.query = query;
    this.headers = headers;
    this.remote_ip = typeof head.remote_ip === 'string' ? head.remote_ip : null;
    this.session_id = id;
    this.instance_id = link.instanceId;
    // Session hand-off: a migrated session starts from what it last saved.
    this.migrated = head.migrated === true;
    this.session_data = this.migrated && head.session_data !== undefined ? head.session_data : {};
    this.client_subject = typeof head.client_subject === 'string' ? head.client_subject : null;
    this.tls = head.tls === true;
    this.#state = new SessionState(link, id);
  }

  get _s() { return this.#state; }

  // Parsed on first use: most handlers read few of them, and every request
  // would pay for all three.
  get path_array() { return this._s.cached('path_array', () => splitPath(this.path)); }
  get query_object() { return this._s.cached('query_object', () => parseQuery(this.query)); }
  get cookies() {
    const cookie = this.headers.cookie;
    return this._s.cached('cookies', () => parseCookies(typeof cookie === 'string' ? cookie : ''));
  }
  get remoteIp() { return this.remote_ip; }
  get instanceId() { return this.instance_id; }
  get sessionId() { return this.session_id; }
  get pathArray() { return this.path_array; }
  get queryObject() { return this.query_object; }
  get clientSubject() { return this.client_subject; }
  get sessionData() { return this.session_data; }
  set sessionData(v) { this.session_data = v; }

  get onData() { return this._s.onData; }
  set onData(fn) { this._s.onData = checkCallback(fn, 'onData'); schedulePump(this); }
  get on_data() { return this._s.onData; }
  set on_data(fn) { this.onData = fn; }
  get onEnd() { return this._s.onEnd; }
  set onEnd(fn) { this._s.onEnd = checkCallback(fn, 'onEnd'); schedulePump(this); }
  get on_end() { return this._s.onEnd; }
  set on_end(fn) { this.onEnd = fn; }
  get onClose() { return this._s.onClose; }
  set onClose(fn) { this._s.onClose = checkCallback(fn, 'onClose'); }
  get on_close() { return this._s.onClose; }
  set on_close(fn) { this.onClose = fn; }

  get closed() { return this._s.closing; }

  // ---- session hand-off ----
  // Keeps session_data in apm, which gives it to the instance that takes
  // the session over when this one leaves (session_persist). Throws when it
  // is not JSON or larger than apm keeps; returns false once the session ended.
  save_session_data() {
    const st = this._s;
    if (st.closing) return false;
    const json = JSON.stringify(this.session_data === undefined ? null : this.session_data);
    if (json === undefined) throw new TypeError('save_session_data(): session_data cannot be JSON');
    const buf = Buffer.from(json, 'utf8');
    if (buf.length > st.link.sessionDataMax) {
      throw new RangeError('save_session_data(): session_data is ' + buf.length + ' bytes as JSON; apm keeps at most ' + st.link.sessionDataMax + ' per session');
    }
    st.link.send(K_SAVE, st.id, buf);
    return true;
  }

  saveSessionData() {
    return this.save_session_data();
  }
  // ---- end of session hand-off ----

  // Returns false when part of the data waits in the connector for credit.
  write(data, headers) {
    const st = this._s;
    if (st.closing) return false;
    const buf = toBuffer(data, 'write()');
    if (this.protocol === 'http' && !st.headSent) {
      const head = headers === undefined || headers === null ? null : encodeHead(headers, st.link.maxFrame);
      st.headSent = true;
      if (head) enqueue(this, K_HEAD, head, false);
    }
    if (this.protocol === 'ws') {
      if (buf.length > MAX_MESSAGE) throw new RangeError('a WebSocket message is at most 16 MiB');
      return enqueue(this, typeof data === 'string' ? K_TEXT : K_DATA, buf, true);
    }
    return buf.length > 0 ? enqueue(this, K_DATA, buf, false) : flush(this);
  }

  write_raw(data) {
    const st = this._s;
    if (st.closing) return false;
    const buf = toBuffer(data, 'write_raw()');
    st.headSent = true; // on HTTP, raw bytes follow the default head
    return buf.length > 0 ? enqueue(this, K_RAW, buf, false) : flush(this);
  }

  writeRaw(data) {
    return this.write_raw(data);
  }

  close(code, reason) {
    const st = this._s;
    if (st.closing) return;
    let payload = EMPTY;
    if (code !== undefined && code !== null) {
      if (!Number.isInteger(code) || code < 0 || code > 65535) throw new RangeError('close(code): code must be an integer 0..65535');
      payload = closePayload(code, reason);
    } else if (this.protocol === 'ws') {
      payload = closePayload(1000, reason);
    } else if (reason !== undefined && reason !== null && reason !== '') {
      payload = closePayload(0, reason);
    }
    sendClose(this, payload);
  }
}

// Head and close frames are not counted against credit.
function isControl(kind) {
  return kind === K_HEAD || kind === K_CLOSE;
}

// The largest payload of one flow-controlled frame.
function frameLimit(link) {
  return Math.min(link.maxFrame, link.window);
}

// Sends a frame at once when nothing waits before it and credit allows it
// whole, as for most responses; anything else takes its turn in the queue.
// Returns whether nothing is left waiting.
function enqueue(s, kind, buf, msg) {
  const st = s._s;
  const ctl = isControl(kind);
  if (st.out.length === 0 && (ctl || (buf.length <= st.sendCredit && buf.length <= frameLimit(st.link)))) {
    if (!ctl) st.sendCredit -= buf.length;
    st.link.send(kind, st.id, buf);
    if (kind === K_CLOSE) forget(s);
    return true;
  }
  st.out.push({ kind: kind, buf: buf, off: 0, msg: msg });
  return flush(s);
}

// Sends what credit allows, in order; returns whether nothing is left waiting.
function flush(s) {
  const st = s._s;
  const link = st.link;
  const limit = frameLimit(link);
  while (st.out.length > 0) {
    const it = st.out[0];
    if (isControl(it.kind)) {
      st.out.shift();
      link.send(it.kind, st.id, it.buf);
      if (it.kind === K_CLOSE) {
        forget(s);
        return true;
      }
      continue;
    }
    const rest = it.buf.length - it.off;
    if (it.msg && it.buf.length <= limit) {
      // A message that fits in one frame is never fragmented.
      if (rest > st.sendCredit) return false;
      st.out.shift();
      st.sendCredit -= rest;
      link.send(it.kind, st.id, it.buf);
      continue;
    }
    // A byte stream may be cut anywhere, and a message too large for one
    // frame goes out as more fragments, each as large as credit allows.
    const n = Math.min(rest, st.sendCredit, limit);
    if (n === 0) return false;
    const last = n === rest;
    link.send(last || !it.msg ? it.kind : K_MORE, st.id, it.buf.subarray(it.off, it.off + n));
    it.off += n;
    st.sendCredit -= n;
    if (last) st.out.shift();
  }
  return true;
}

function sendClose(s, payload) {
  const st = s._s;
  st.closing = true;
  st.events = [];
  st.frags = [];
  enqueue(s, K_CLOSE, payload, false);
}

function forget(s) {
  const st = s._s;
  st.closing = true;
  st.out = [];
  st.events = [];
  st.frags = [];
  st.fragBytes = 0;
  if (st.link.sessions.get(st.id) === s) st.link.sessions.delete(st.id);
}

function grant(s, n) {
  const st = s._s;
  if (n === 0 || st.closing) return;
  st.recvCredit += n;
  st.link.send(K_CREDIT, st.id, u32(n));
}

function fault(s, err, where) {
  const st = s._s;
  process.stderr.write('apm_module: session ' + st.id + ': ' + where + ' failed: ' + describe(err) + '\n');
  if (st.closing) return;
  if (s.protocol === 'http' && !st.headSent) {
    st.headSent = true;
    enqueue(s, K_HEAD, '{"x-status":"500","content-type":"text/plain"}', false);
    enqueue(s, K_DATA, Buffer.from('Internal Server Error\n'), false);
  }
  sendClose(s, s.protocol === 'ws' ? closePayload(1011, 'internal error') : EMPTY);
}

// Setting a callback from inside the app's own code must not run another
// callback re-entrantly, so delivery waits for a microtask.
function schedulePump(s) {
  const st = s._s;
  if (st.pumpScheduled || st.events.length === 0) return;
  st.pumpScheduled = true;
  queueMicrotask(() => {
    st.pumpScheduled = false;
    pump(s);
  });
}

// Delivers data and end in order, one callback at a time. While the app's
// handler is still running (an async handler awaiting something), an event
// waits for its callback to be set rather than being dropped. Credit for data
// goes back only once its callback has returned, or its Promise settled.
function pump(s) {
  const st = s._s;
  if (st.pumping) return;
  st.pumping = true;
  try {
    while (!st.busy && !st.closing && st.events.length > 0) {
      const ev = st.events[0];
      const cb = ev.end ? st.onEnd : st.onData;
      if (!cb && st.handlerPending) break;
      st.events.shift();
      if (!cb) {
        grant(s, ev.credit);
        // A TCP app without onEnd ends with its client, as a net.Socket
        // without allowHalfOpen does, once the writes queued so far are out.
        if (ev.end && s.protocol === 'tcp') {
          s.close();
          break;
        }
        continue;
      }
      const where = ev.end ? 'onEnd' : 'onData';
      let r;
      try {
        r = ev.end ? cb.call(s) : cb.call(s, ev.data, ev.isBinary);
      } catch (e) {
        fault(s, e, where);
        break;
      }
      if (r && typeof r.then === 'function') {
        st.busy = true;
        Promise.resolve(r).then(
          () => {
            st.busy = false;
            grant(s, ev.credit);
            pump(s);
          },
          (e) => {
            st.busy = false;
            fault(s, e, where);
          }
        );
        break;
      }
      grant(s, ev.credit);
    }
  } finally {
    st.pumping = false;
  }
  handOver(s);
}

// ---- session hand-off ----
// Once the app has taken what arrived before `migrate` and its writes are
// out, the session is apm's to move: `handed`, and forgotten without the
// app's close callback (the client did not leave).
function handOver(s) {
  const st = s._s;
  if (!st.migrating || st.closing || st.busy || st.handlerPending || st.events.length > 0 || st.out.length > 0) return;
  st.link.send(K_HANDED, st.id, EMPTY);
  forget(s);
}
// ---- end of session hand-off ----

class Link {
  constructor(fd, handler) {
    this.handler = handler;
    this.maxFrame = DEFAULT_MAX_FRAME;
    this.window = 0;
    this.helloSeen = false;
    this.instanceId = null;
    this.worker = null;
    this.sessionDataMax = DEFAULT_SESSION_DATA_MAX;
    this.sessions = new Map();
    this.chunks = [];
    this.offset = 0; // where the unread bytes of chunks[0] start
    this.buffered = 0;
    this.need = -1; // length of the frame being read, once its prefix is in
    this.outFrames = []; // kind, session, payload of each frame sent in this tick
    this.outBytes = 0;
    let sock;
    try {
      sock = new net.Socket({ fd: fd, readable: true, writable: true });
    } catch (e) {
      die('cannot use descriptor ' + fd + ' from APM_FD as the channel: ' + e.message);
    }
    this.sock = sock;
    sock.on('data', (chunk) => this.receive(chunk));
    // The daemon is gone or is stopping this instance: nothing is left to serve.
    sock.on('end', () => process.exit(0));
    // A write that meets the closed channel is the same ending, seen first.
    sock.on('error', (e) => (e.code === 'EPIPE' || e.code === 'ECONNRESET' ? process.exit(0) : die('channel: ' + e.message)));
  }

  fail(why) {
    die('connector protocol error: ' + why);
  }

  // `payload` is a Buffer, or a string (a JSON head) that is encoded
  // straight into the outgoing buffer.
  send(kind, sid, payload) {
    if (this.outFrames.length === 0) {
      // Frames sent in one tick (a head, its body, the close) leave in one
      // write, and apm wakes up once for them.
      process.nextTick(() => this.writeFrames());
    }
    this.outFrames.push(kind, sid, payload);
    // A string's UTF-8 takes at most 3 bytes per UTF-16 unit: room enough.
    this.outBytes += 9 + (typeof payload === 'string' ? 3 * payload.length : payload.length);
  }

  writeFrames() {
    const frames = this.outFrames;
    const total = this.outBytes;
    this.outFrames = [];
    this.outBytes = 0;
    // Small frames are copied into one buffer: one stream write costs less
    // than one per header and payload. Large payloads are not copied.
    const copy = total <= COALESCE_BYTES;
    const out = Buffer.allocUnsafe(copy ? total : 9 * (frames.length / 3));
    let off = 0;
    if (!copy) this.sock.cork();
    for (let i = 0; i < frames.length; i += 3) {
      let payload = frames[i + 2];
      const start = off;
      let size;
      if (copy) {
        size = typeof payload === 'string' ? out.write(payload, off + 9) : payload.copy(out, off + 9);
      } else {
        if (typeof payload === 'string') payload = Buffer.from(payload, 'utf8');
        size = payload.length;
      }
      out.writeUInt32BE(5 + size, off);
      out[off + 4] = frames[i];
      out.writeUInt32BE(frames[i + 1], off + 5);
      off += 9;
      if (copy) {
        off += size;
      } else {
        this.sock.write(out.subarray(start, off));
        if (size > 0) this.sock.write(payload);
      }
    }
    if (copy) this.sock.write(off === total ? out : out.subarray(0, off));
    else this.sock.uncork();
  }

  // Marks chunks[0] read up to `end`.
  advance(end) {
    if (end === this.chunks[0].length) {
      this.chunks.shift();
      this.offset = 0;
    } else {
      this.offset = end;
    }
  }

  // The next n buffered bytes: a view when they lie in one chunk, else a copy.
  take(n) {
    this.buffered -= n;
    const first = this.chunks[0];
    const start = this.offset;
    if (first.length - start >= n) {
      this.advance(start + n);
      return first.subarray(start, start + n);
    }
    const out = Buffer.allocUnsafe(n);
    let off = 0;
    while (off < n) {
      const c = this.chunks[0];
      const k = Math.min(c.length - this.offset, n - off);
      c.copy(out, off, this.offset, this.offset + k);
      off += k;
      this.advance(this.offset + k);
    }
    return out;
  }

  // Frames are read in place where they lie in one chunk: a view of a
  // Buffer costs an allocation, and most frames need one for their payload
  // at most.
  receive(chunk) {
    this.chunks.push(chunk);
    this.buffered += chunk.length;
    for (;;) {
      if (this.need < 0) {
        if (this.buffered < 4) return;
        const first = this.chunks[0];
        let len;
        if (first.length - this.offset >= 4) {
          len = first.readUInt32BE(this.offset);
          this.buffered -= 4;
          this.advance(this.offset + 4);
        } else {
          len = this.take(4).readUInt32BE(0);
        }
        // Checked before reading on, so a corrupt length cannot make the connector buffer gigabytes.
        if (len < 5 || len > 5 + this.maxFrame) {
          this.fail('frame length ' + len + ' is outside 5..' + (5 + this.maxFrame));
          return;
        }
        this.need = len;
      }
      const need = this.need;
      if (this.buffered < need) return;
      this.need = -1;
      const first = this.chunks[0];
      const at = this.offset;
      if (first.length - at >= need) {
        this.buffered -= need;
        this.advance(at + need);
        const payload = need === 5 ? EMPTY : first.subarray(at + 5, at + need);
        this.dispatch(first[at], first.readUInt32BE(at + 1), payload);
      } else {
        const frame = this.take(need);
        this.dispatch(frame[0], frame.readUInt32BE(1), frame.subarray(5));
      }
    }
  }

  json(payload, what) {
    let v;
    try {
      v = JSON.parse(payload.toString('utf8'));
    } catch (e) {
      this.fail(what + ': payload is not JSON (' + e.message + ')');
    }
    if (!isPlainObject(v)) this.fail(what + ': payload is not a JSON object');
    return v;
  }

  dispatch(kind, sid, payload) {
    if (!this.helloSeen && kind !== K_HELLO) return this.fail('a frame of kind ' + kind + ' before hello');
    if (((kind >= K_OPEN && kind <= K_CREDIT) || kind === K_MIGRATE) && sid === 0) return this.fail('a frame of kind ' + kind + ' on session 0');
    switch (kind) {
      case K_HELLO:
        return this.onHello(sid, payload);
      case K_OPEN:
        return this.onOpen(sid, payload);
      case K_DATA:
      case K_TEXT:
      case K_MORE:
        return this.onData(kind, sid, payload);
      case K_END:
        return this.onEnd(sid, payload);
      case K_CLOSE:
        return this.onClose(sid, payload);
      case K_CREDIT:
        return this.onCredit(sid, payload);
      case K_MIGRATE:
        return this.onMigrate(sid, payload);
      case K_READY:
      case K_HEAD:
      case K_RAW:
      case K_SAVE:
      case K_HANDED:
        return this.fail('the daemon sent a frame of kind ' + kind + ', which only a child sends');
      default:
        // IPC (feature "ipc")
        if (kind >= K_SEND && kind <= 47) return this.ipc.dispatch(kind, sid, payload);
        return this.fail('unknown frame kind ' + kind);
    }
  }

  onHello(sid, payload) {
    if (this.helloSeen) return this.fail('a second hello');
    if (sid !== 0) return this.fail('hello on session ' + sid);
    const h = this.json(payload, 'hello');
    if (h.protocol === undefined) return this.fail('hello without protocol');
    if (h.protocol !== PROTOCOL) {
      return die('this connector speaks protocol ' + PROTOCOL + ', apm speaks ' + h.protocol + '; update apm_module');
    }
    if (!Number.isInteger(h.max_frame) || h.max_frame < 1) return this.fail('hello: max_frame is not a positive integer');
    if (!Number.isInteger(h.window) || h.window < 1) return this.fail('hello: window is not a positive integer');
    this.helloSeen = true;
    this.maxFrame = h.max_frame;
    this.window = h.window;
    this.instanceId = h.instance_id === undefined ? null : h.instance_id;
    this.worker = h.worker === undefined ? null : h.worker;
    if (Number.isInteger(h.session_data_max) && h.session_data_max > 0) this.sessionDataMax = h.session_data_max;
    const features = ['migrate']; // session hand-off
    features.push('ipc'); // IPC (feature "ipc")
    // The handler came with the constructor, so the app is ready as soon as the channel is.
    const ready = JSON.stringify({ protocol: PROTOCOL, connector: 'node ' + process.versions.node, half_close: true, features: features });
    this.send(K_READY, 0, Buffer.from(ready, 'utf8'));
    this.ipc.ready(); // IPC (feature "ipc")
  }

  onOpen(sid, payload) {
    if (this.sessions.has(sid)) return this.fail('open for session ' + sid + ', which is already open');
    const head = this.json(payload, 'open');
    if (typeof head.protocol !== 'string') return this.fail('open: protocol is not a string');
    const s = new ApmSession(this, sid, head);
    this.sessions.set(sid, s);
    const st = s._s;
    let r;
    try {
      r = this.handler(s);
    } catch (e) {
      st.handlerPending = false;
      fault(s, e, 'the session handler');
      return;
    }
    if (r && typeof r.then === 'function') {
      Promise.resolve(r).then(
        () => {
          st.handlerPending = false;
          pump(s);
        },
        (e) => {
          st.handlerPending = false;
          fault(s, e, 'the session handler');
        }
      );
    } else {
      st.handlerPending = false;
    }
  }

  onData(kind, sid, payload) {
    const s = this.sessions.get(sid);
    if (!s) return; // closed, its frames crossing the close on the wire, or never opened
    const st = s._s;
    if (payload.length > st.recvCredit) {
      return this.fail('session ' + sid + ': ' + payload.length + ' bytes sent with ' + st.recvCredit + ' bytes of credit');
    }
    st.recvCredit -= payload.length;
    if (st.closing) return;
    if (kind === K_MORE) {
      // Fragments are consumed into the connector's buffer: withholding their
      // credit would deadlock any message larger than the window.
      st.frags.push(payload);
      st.fragBytes += payload.length;
      grant(s, payload.length);
      return;
    }
    let body = payload;
    if (st.frags.length > 0) {
      st.frags.push(payload);
      body = Buffer.concat(st.frags, st.fragBytes + payload.length);
      st.frags = [];
      st.fragBytes = 0;
    }
    const binary = kind === K_DATA;
    st.events.push({ end: false, data: binary ? body : body.toString('utf8'), isBinary: binary, credit: payload.length });
    pump(s);
  }

  onEnd(sid, payload) {
    if (payload.length !== 0) return this.fail('end on session ' + sid + ' with a payload');
    const s = this.sessions.get(sid);
    if (!s || s._s.closing) return;
    s._s.events.push({ end: true, credit: 0 });
    pump(s);
  }

  onClose(sid, payload) {
    if (payload.length === 1) return this.fail('close on session ' + sid + ' with a 1-byte payload');
    const s = this.sessions.get(sid);
    if (!s) return;
    const st = s._s;
    // The app that closed first hears nothing back: its close crossed this one.
    const notify = !st.closing;
    forget(s);
    const cb = st.onClose;
    if (!notify || !cb) return;
    const code = payload.length >= 2 ? payload.readUInt16BE(0) : 0;
    const reason = payload.length > 2 ? payload.subarray(2).toString('utf8') : '';
    try {
      const r = cb.call(s, code, reason);
      if (r && typeof r.then === 'function') Promise.resolve(r).catch((e) => fault(s, e, 'onClose'));
    } catch (e) {
      fault(s, e, 'onClose');
    }
  }

  onCredit(sid, payload) {
    if (payload.length !== 4) return this.fail('credit on session ' + sid + ' with a ' + payload.length + '-byte payload');
    const s = this.sessions.get(sid);
    if (!s) return;
    s._s.sendCredit += payload.readUInt32BE(0);
    flush(s);
    handOver(s);
  }

  // ---- session hand-off ----
  onMigrate(sid, payload) {
    if (payload.length !== 0) return this.fail('migrate on session ' + sid + ' with a payload');
    const s = this.sessions.get(sid);
    if (!s || s._s.closing) return;
    s._s.migrating = true;
    handOver(s);
  }
  // ---- end of session hand-off ----
}

// ---- IPC (feature "ipc", docs/connector-protocol.md): begin ----
const K_SEND = 32;
const K_REQUEST = 33;
const K_MESSAGE = 34;
const K_REPLY = 35;
const K_RESULT = 36;
const K_STREAM_OPEN = 37;
const K_STREAM_OFFER = 38;
const K_STREAM_ACCEPT = 39;
const K_STREAM_JOIN = 40;
const K_STREAM_DATA = 41;
const K_STREAM_CLOSE = 42;
const K_DASH = 43;
const K_METRIC = 44;
const METRIC_TYPES = ['counter', 'gauge', 'timing'];
const NO_PEER = Buffer.alloc(4);
// Ids this side picks for its requests and the streams it mediates.
const MAX_OWN_ID = 0x7fffffff;

function callApp(fn, what, args) {
  try {
    const r = fn.apply(null, args);
    if (r && typeof r.then === 'function') {
      return Promise.resolve(r).catch((e) => process.stderr.write('apm_module: uncaught exception in ' + what + ': ' + describe(e) + '\n'));
    }
    return r;
  } catch (e) {
    process.stderr.write('apm_module: uncaught exception in ' + what + ': ' + describe(e) + '\n');
    return undefined;
  }
}

class Ipc {
  constructor(link, module) {
    this.link = link;
    this.module = module;
    this.nextId = 0;
    this.requests = new Map(); // request id -> resolve
    this.opening = new Map(); // stream id -> { resolve, stream }
    this.mediated = new Map(); // stream id -> ApmStream (mediator side)
    this.peerOf = new Map(); // peer id -> ApmStream (peer side, offered or joined)
    // IPC frames may only follow `ready`, which waits for hello: calls made
    // right after the constructor (the reference's setDashValue) wait here.
    this.held = [];
  }

  frame(kind, id, payload) {
    if (this.held !== null) this.held.push([kind, id, payload]);
    else this.link.send(kind, id, payload);
  }

  // `ready` is out: what waited follows it.
  ready() {
    const held = this.held;
    this.held = null;
    for (const f of held) this.link.send(f[0], f[1], f[2]);
  }

  ownId() {
    for (;;) {
      this.nextId = this.nextId >= MAX_OWN_ID ? 1 : this.nextId + 1;
      const id = this.nextId;
      if (!this.requests.has(id) && !this.opening.has(id) && !this.mediated.has(id)) return id;
    }
  }

  // A JSON frame; one larger than a frame can carry fails the call here
  // instead of breaking the link.
  sendJson(kind, id, value, what) {
    const text = JSON.stringify(value);
    const bytes = Buffer.from(text, 'utf8');
    if (bytes.length > this.link.maxFrame) {
      throw new RangeError(what + ': ' + bytes.length + ' bytes of JSON, more than a frame carries (' + this.link.maxFrame + ')');
    }
    this.frame(kind, id, bytes);
  }

  sendData(id, peer, data) {
    const text = typeof data === 'string';
    const bytes = toBuffer(data, 'write');
    if (bytes.length + 5 > this.link.maxFrame) {
      throw new RangeError('write: ' + bytes.length + ' bytes, more than a frame carries (' + (this.link.maxFrame - 5) + ')');
    }
    const prefix = Buffer.allocUnsafe(5);
    prefix.writeUInt32BE(peer >>> 0, 0);
    prefix[4] = text ? 1 : 0;
    this.frame(K_STREAM_DATA, id, Buffer.concat([prefix, bytes]));
  }

  dispatch(kind, id, payload) {
    switch (kind) {
      case K_MESSAGE:
        return this.onMessage(id, payload);
      case K_RESULT:
        return this.onResult(id, payload);
      case K_STREAM_OFFER:
        return this.onOffer(id, payload);
      case K_STREAM_JOIN:
        return this.onJoin(id, payload);
      case K_STREAM_DATA:
        return this.onData(id, payload);
      case K_STREAM_CLOSE:
        return this.onClose(id, payload);
      default:
        return this.link.fail('IPC frame kind ' + kind + ' is not for a connector to receive');
    }
  }

  onMessage(id, payload) {
    const m = this.link.json(payload, 'message');
    const handler = this.module.onChannel;
    let replied = id === 0;
    const reply = (data) => {
      if (replied) return;
      replied = true;
      this.sendJson(K_REPLY, id, { data: data === undefined ? null : data }, 'reply');
    };
    if (typeof handler !== 'function') return;
    const r = callApp(handler, 'onChannel', [m.channel, m.data === undefined ? null : m.data, id === 0 ? undefined : reply]);
    // What the handler returns (or its promise gives) answers a request it did not reply to.
    if (id !== 0) Promise.resolve(r).then((v) => { if (v !== undefined) reply(v); }, () => {});
  }

  onResult(id, payload) {
    const r = this.link.json(payload, 'result');
    const resolve = this.requests.get(id);
    if (!resolve) return;
    this.requests.delete(id);
    resolve(r.status === 'reply' && r.data !== undefined ? r.data : null);
  }

  onOffer(peer, payload) {
    const o = this.link.json(payload, 'stream_offer');
    const s = new ApmStream(this, peer, false);
    s.channel = o.channel;
    s.head = o.head === undefined ? null : o.head;
    s.peerId = peer;
    this.peerOf.set(peer, s);
    const handler = this.module.onStream;
    if (typeof handler !== 'function') return s.close();
    callApp(handler, 'onStream', [s]);
  }

  onJoin(id, payload) {
    if (payload.length !== 4) return this.link.fail('stream_join with a ' + payload.length + '-byte payload');
    const peer = payload.readUInt32BE(0);
    const opening = this.opening.get(id);
    let s = this.mediated.get(id);
    if (opening) {
      this.opening.delete(id);
      s = opening.stream;
      this.mediated.set(id, s);
    }
    if (!s) return;
    s.peers.add(peer);
    if (opening) opening.resolve(s);
    if (s.onJoin) callApp(s.onJoin, 'onJoin', [peer]);
  }

  onData(id, payload) {
    if (payload.length < 5) return this.link.fail('stream_data shorter than its peer id and type');
    const s = this.mediated.get(id) || this.peerOf.get(id);
    if (!s || s.closed || !s.onData) return;
    const bytes = payload.subarray(5);
    const data = payload[4] === 1 ? bytes.toString('utf8') : Buffer.from(bytes);
    if (s.mediator) callApp(s.onData, 'onData', [data, payload.readUInt32BE(0)]);
    else callApp(s.onData, 'onData', [data]);
  }

  onClose(id, payload) {
    if (payload.length !== 4) return this.link.fail('stream_close with a ' + payload.length + '-byte payload');
    const peer = payload.readUInt32BE(0);
    const opening = this.opening.get(id);
    if (opening) {
      // Refused before any peer joined.
      this.opening.delete(id);
      return opening.resolve(null);
    }
    const s = this.mediated.get(id) || this.peerOf.get(id);
    if (!s) return;
    if (s.mediator && peer !== 0) {
      s.peers.delete(peer);
      if (s.onLeave) callApp(s.onLeave, 'onLeave', [peer]);
      return;
    }
    s.forget();
    if (s.onClose) callApp(s.onClose, 'onClose', []);
  }
}

// One stream: the mediator's (from requestStream) or a peer's (onStream).
class ApmStream {
  constructor(ipc, id, mediator) {
    Object.defineProperty(this, '_ipc', { value: ipc });
    Object.defineProperty(this, '_id', { value: id });
    this.mediator = mediator;
    this.peers = new Set();
    this.accepted = mediator;
    this.closed = false;
    this.onData = null;
    this.onClose = null;
    this.onJoin = null;
    this.onLeave = null;
  }

  // A peer accepts the offer; until it does, it neither receives nor writes.
  accept() {
    if (this.mediator || this.accepted || this.closed) return this;
    this.accepted = true;
    this._ipc.frame(K_STREAM_ACCEPT, this._id, EMPTY);
    return this;
  }

  // Text (a string) or bytes; the mediator's go to every peer, or to one
  // with `peerId`. Writes to a closed stream are dropped.
  write(data, peerId) {
    if (this.closed || !this.accepted) return false;
    this._ipc.sendData(this._id, this.mediator && peerId ? peerId : 0, data);
    return true;
  }

  close() {
    if (this.closed) return;
    this._ipc.frame(K_STREAM_CLOSE, this._id, NO_PEER);
    this.forget();
  }

  forget() {
    this.closed = true;
    if (this.mediator) this._ipc.mediated.delete(this._id);
    else this._ipc.peerOf.delete(this._id);
  }
}

function checkChannel(channel) {
  if (typeof channel !== 'string' || channel === '') throw new TypeError('a channel is a non-empty string');
}

function timeoutMs(timeout) {
  if (timeout === undefined || timeout === null) return null;
  if (typeof timeout !== 'number' || !(timeout >= 0)) throw new TypeError('a timeout is a number of milliseconds');
  return timeout;
}

// The IPC methods of ApmModule (the reference's "Connector IPC API").
const IPC_METHODS = {
  send(channel, data) {
    checkChannel(channel);
    this._ipc.sendJson(K_SEND, 0, { channel: channel, data: data === undefined ? null : data }, 'send');
  },

  // Resolves to the first reply's data, or null (timeout, no listener).
  request(channel, data, timeout) {
    checkChannel(channel);
    const ipc = this._ipc;
    const id = ipc.ownId();
    ipc.sendJson(K_REQUEST, id, { channel: channel, data: data === undefined ? null : data, timeout_ms: timeoutMs(timeout) }, 'request');
    return new Promise((resolve) => ipc.requests.set(id, resolve));
  },

  // Resolves to an ApmStream once a peer joined, or null when none did.
  requestStream(channel, head, timeout) {
    checkChannel(channel);
    const ipc = this._ipc;
    const id = ipc.ownId();
    const stream = new ApmStream(ipc, id, true);
    stream.channel = channel;
    stream.head = head === undefined ? null : head;
    ipc.sendJson(K_STREAM_OPEN, id, { channel: channel, head: stream.head, timeout_ms: timeoutMs(timeout) }, 'requestStream');
    return new Promise((resolve) => ipc.opening.set(id, { resolve: resolve, stream: stream }));
  },

  setDashValue(id, value, color) {
    if (typeof id !== 'string' && typeof id !== 'number') throw new TypeError('setDashValue: an id is a string or a number');
    this._ipc.sendJson(K_DASH, 0, { id: id, value: value === undefined ? null : value, color: color === undefined ? null : color }, 'setDashValue');
  },

  metric(name, value, type) {
    const kind = type === undefined ? 'counter' : type;
    if (typeof name !== 'string' || name === '') throw new TypeError('metric: a name is a non-empty string');
    if (typeof value !== 'number' || !Number.isFinite(value)) throw new TypeError('metric: a value is a finite number');
    if (METRIC_TYPES.indexOf(kind) < 0) throw new TypeError('metric: a type is one of ' + METRIC_TYPES.join(', '));
    this._ipc.sendJson(K_METRIC, 0, { name: name, value: value, type: kind }, 'metric');
  },
};
// ---- IPC: end ----

class ApmModule {
  constructor(handler) {
    if (process.env.APM !== '1') die('start this app with apm run (APM is not set)');
    const fd = process.env.APM_FD;
    if (fd === undefined || fd === '') {
      die('this worker has no connector channel: give it server lines and upstream connector, or listen (APM_FD is not set)');
    }
    if (!/^[0-9]+$/.test(fd)) die('APM_FD is not a descriptor number: ' + fd);
    // A worker that only takes part in IPC (listen, no server lines) needs no handler.
    if (handler === undefined) handler = () => { throw new Error('this worker has no session handler: pass one to new ApmModule(handler)'); };
    if (typeof handler !== 'function') throw new TypeError('new ApmModule(handler): handler must be a function');
    if (constructed) throw new Error('apm_module: only one ApmModule per process can read the channel');
    constructed = true;
    Object.defineProperty(this, '_link', { value: new Link(Number(fd), handler) });
    // IPC (feature "ipc")
    Object.defineProperty(this, '_ipc', { value: new Ipc(this._link, this) });
    this._link.ipc = this._ipc;
    this.onChannel = null;
    this.onStream = null;
  }

  // Known once hello has arrived, shortly after construction; null before.
  get instanceId() { return this._link.instanceId; }
  get instance_id() { return this._link.instanceId; }
  get worker() { return this._link.worker; }
}

ApmModule.ApmSession = ApmSession;
// IPC (feature "ipc")
Object.assign(ApmModule.prototype, IPC_METHODS);
ApmModule.ApmStream = ApmStream;
// ---- end of shared body ----
module.exports = ApmModule;
