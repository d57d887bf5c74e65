--[[
apm_module.lua: the Lua connector of apm (connector protocol version 1).

One drop-in file for Lua 5.3 and 5.4. It needs lua-cjson for JSON and luv
(libuv's binding) to wait on the channel's descriptor, as Lua's own io
library cannot open a socket by number. On Debian:

    apt-get install lua5.4 lua-cjson lua-luv      (or lua5.3)

    package.path = '/path/to/connectors/?.lua;' .. package.path
    local ApmModule = require('apm_module')

    local apm = ApmModule.new(function(s)
        s:write('Hello World', { ['x-status'] = '200', ['content-type'] = 'text/plain' })
        s:close()
    end)
    apm:run()

apm owns the client's socket and hands each HTTP request, WebSocket or TCP
connection to the app as a session, over the descriptor named by APM_FD
(docs/connector-protocol.md is the contract). The loop (libuv's default
loop) is single-threaded: callbacks run one at a time, and sessions may only
be used from them. A session's fields: protocol, method, path, path_array,
query, query_object, headers, cookies, remote_ip, tls, client_subject,
session_id, instance_id, session_data, migrated; the app sets on_data
(function(data, is_binary)), on_end and on_close (function(code, reason)).
Lua strings are bytes: on WebSocket, s:write(text) sends a text message
(it must be UTF-8) and s:write(bytes, true) a binary one. IPC with other
workers (`listen` in their config): apm:send(ch, d), apm:request(ch, d,
timeout_ms) (yields the callback it is called from; the loop goes on),
apm:request_stream(ch, head, timeout_ms) (an ApmStream or nil),
apm.on_channel = function(ch, d, reply), apm.on_stream = function(stream),
apm:set_dash_value(id, value, color), apm:metric(name, value, type).
lua-cjson writes an empty table as {}: ApmModule.array(t) makes it [] in
IPC data. luv cannot mark
the inherited descriptor close-on-exec: a process the app starts
(io.popen, os.execute) sees it and must leave it alone.
]]

local uv = require('luv')
local cjson = require('cjson')

local PROTOCOL = 1

local K_HELLO, K_READY = 1, 2
local K_OPEN, K_DATA, K_TEXT, K_MORE, K_END, K_HEAD, K_RAW, K_CLOSE, K_CREDIT = 16, 17, 18, 19, 20, 21, 22, 23, 24
-- Session hand-off (feature "migrate").
local K_SAVE, K_MIGRATE, K_HANDED = 48, 49, 50

local RECEIVED = {
  [K_OPEN] = true, [K_DATA] = true, [K_TEXT] = true, [K_MORE] = true, [K_END] = true,
  [K_CLOSE] = true, [K_CREDIT] = true, [K_MIGRATE] = true,
}

-- Until `hello` announces them, the version 1 values bound frames.
local DEFAULT_MAX_FRAME = 1048576
local DEFAULT_WINDOW = 262144
local DEFAULT_SESSION_DATA_MAX = 65536
local MAX_MESSAGE = 16777216
local MAX_CLOSE_REASON = 123

local function die(message)
  io.stderr:write('apm_module: ' .. message .. '\n')
  os.exit(1)
end

local function protocol_error(why)
  die('protocol error from apm: ' .. why)
end

-- JSON null, and anything not of the type wanted, is absent.
local function field(head, name, kind)
  local v = head[name]
  if type(v) == kind then return v end
  return nil
end

-- Percent-decoding as JavaScript's decodeURIComponent, which the Node
-- connector uses: a malformed escape or bytes that are not UTF-8 leave the
-- text as sent.
local function decode(text)
  if not text:find('%', 1, true) or text:find('%%%X') or text:find('%%%x%X') or text:find('%%.?$') then
    return text
  end
  local decoded = text:gsub('%%(%x%x)', function(hex) return string.char(tonumber(hex, 16)) end)
  if utf8.len(decoded) then return decoded end
  return text
end

local function parse_query(query)
  local result = {}
  for pair in query:gmatch('[^&]+') do
    local eq = pair:find('=', 1, true)
    local name = decode((eq and pair:sub(1, eq - 1) or pair):gsub('%+', ' '))
    local value = eq and decode((pair:sub(eq + 1):gsub('%+', ' '))) or ''
    local prev = result[name]
    if prev == nil then
      result[name] = value
    elseif type(prev) == 'table' then
      prev[#prev + 1] = value
    else
      result[name] = { prev, value }
    end
  end
  return result
end

local function parse_cookies(header)
  local cookies = {}
  for part in header:gmatch('[^;]+') do
    local eq = part:find('=', 1, true)
    if eq then
      local name = part:sub(1, eq - 1):match('^%s*(.-)%s*$')
      -- The first of two same-named cookies is the most specific one.
      if name ~= '' and cookies[name] == nil then
        local value = part:sub(eq + 1):match('^%s*(.-)%s*$')
        if #value >= 2 and value:sub(1, 1) == '"' and value:sub(-1) == '"' then
          value = value:sub(2, -2)
        end
        cookies[name] = decode(value)
      end
    end
  end
  return cookies
end

local function header_value(name, v)
  if math.type(v) == 'float' and math.tointeger(v) then v = math.tointeger(v) end
  if type(v) ~= 'string' and type(v) ~= 'number' and type(v) ~= 'boolean' then
    error('header ' .. name .. ': a value must be a string or an array of strings', 4)
  end
  local s = tostring(v)
  -- apm treats a malformed head as a broken connector and kills the
  -- instance; refusing here fails one request instead.
  if s:find('[\r\n%z]') then error('header ' .. name .. ': a value may not contain CR, LF or NUL', 4) end
  if not utf8.len(s) then error('header ' .. name .. ': a value must be UTF-8', 4) end
  return s
end

local function encode_head(headers, max_frame)
  local head = {}
  for raw_name, v in pairs(headers) do
    local name = tostring(raw_name):lower()
    if not name:find("^[!#$%%&'*+%-.^_`|~0-9a-z]+$") then
      error('invalid header name: ' .. tostring(raw_name), 3)
    end
    local value
    if type(v) == 'table' then
      value = {}
      for i, x in ipairs(v) do value[i] = header_value(name, x) end
      -- cjson writes an empty table as {}, which no header value may be.
      if #value == 0 then value = nil end
    else
      value = header_value(name, v)
    end
    local prev = head[name]
    if value == nil then
      value = prev
    elseif prev ~= nil then
      -- Set-Cookie and set-cookie are one header.
      local merged = type(prev) == 'table' and prev or { prev }
      for _, x in ipairs(type(value) == 'table' and value or { value }) do merged[#merged + 1] = x end
      value = merged
    end
    head[name] = value
  end
  local status = head['x-status']
  if status ~= nil and (type(status) == 'table' or not status:find('^[1-9]%d%d$')) then
    error('x-status must be a three-digit HTTP status, not ' .. cjson.encode(status), 3)
  end
  local json = cjson.encode(head)
  if #json > max_frame then error('the response headers do not fit in one frame', 3) end
  return json
end

local function cut_reason(reason)
  if #reason <= MAX_CLOSE_REASON then return reason end
  local stop = MAX_CLOSE_REASON
  -- Do not cut a character in half.
  while stop > 0 and (reason:byte(stop + 1) & 0xC0) == 0x80 do stop = stop - 1 end
  return reason:sub(1, stop)
end

local ApmSession = {}
ApmSession.__index = ApmSession

local function new_session(module, session_id, head)
  local path = field(head, 'path', 'string') or ''
  local query = field(head, 'query', 'string') or ''
  local headers = field(head, 'headers', 'table') or {}
  local path_array = {}
  -- Split before decoding, so that an encoded '/' stays inside its segment.
  for segment in path:gmatch('[^/]+') do path_array[#path_array + 1] = decode(segment) end
  local session_data = head.session_data
  if session_data == nil or session_data == cjson.null then session_data = {} end
  return setmetatable({
    protocol = field(head, 'protocol', 'string') or 'http',
    method = field(head, 'method', 'string') or '',
    path = path,
    path_array = path_array,
    query = query,
    query_object = parse_query(query),
    headers = headers,
    cookies = parse_cookies(type(headers.cookie) == 'string' and headers.cookie or ''),
    remote_ip = field(head, 'remote_ip', 'string'),
    tls = head.tls == true,
    client_subject = field(head, 'client_subject', 'string'),
    session_id = session_id,
    instance_id = module.instance_id,
    session_data = session_data,
    migrated = head.migrated == true,
    on_data = nil,
    on_end = nil,
    on_close = nil,
    _module = module,
    _open = true,       -- false once a close went out or came in
    _closing = false,   -- the app called close(), or the session is handed off
    _started = false,   -- HTTP: the response has begun
    _credit = module._window,     -- bytes we may still send
    _allowance = module._window,  -- bytes apm may still send us
    _queue = {},        -- {kind, payload, offset} waiting for credit, in order
    _queue_head = 1,    -- the first waiting entry
    _queue_tail = 0,    -- the last one
    _partial = {},      -- a WebSocket message arriving in `more` fragments
  }, ApmSession)
end

--[[ Sends body bytes (HTTP), bytes (TCP) or one WebSocket message.

HTTP: headers (a table) on the first write is the response head
('x-status' is the status; a list value sends the header several times);
later headers are ignored. WebSocket: a text message, or a binary one when
the second argument is true. Writes never block: what exceeds the session's
credit waits in the connector. Raises an error on headers HTTP cannot carry
or a text message that is not UTF-8. ]]
function ApmSession:write(data, headers)
  if self._closing then return false end
  data = data == nil and '' or tostring(data)
  if self.protocol == 'ws' then
    local binary = headers == true
    if not binary and not utf8.len(data) then
      error('a WebSocket text message must be UTF-8; write(data, true) sends a binary message', 2)
    end
    if #data > MAX_MESSAGE then error('a WebSocket message is at most 16 MiB', 2) end
    self:_enqueue(binary and K_DATA or K_TEXT, data)
    return true
  end
  if self.protocol == 'http' and not self._started then
    if type(headers) == 'table' and next(headers) ~= nil then
      local head = encode_head(headers, self._module._max_frame)
      self._started = true
      self:_enqueue(K_HEAD, head)
    end
    self._started = true
  end
  if #data > 0 then self:_enqueue(K_DATA, data) end
  return true
end

-- Bytes for the client's socket as they are (WebSocket: outside its
-- framing; HTTP and TCP: the same as write()).
function ApmSession:write_raw(data)
  if self._closing then return false end
  data = data == nil and '' or tostring(data)
  self._started = true
  if #data > 0 then self:_enqueue(K_RAW, data) end
  return true
end

-- Ends the session once the queued writes are out (HTTP: ends the
-- response; WebSocket: close code and reason, 1000 by default).
function ApmSession:close(code, reason)
  if self._closing then return end
  self._closing = true
  local payload = ''
  if code ~= nil or reason ~= nil or self.protocol == 'ws' then
    code = code or (self.protocol == 'ws' and 1000 or 0)
    payload = string.pack('>I2', code) .. cut_reason(reason == nil and '' or tostring(reason))
  end
  self:_enqueue(K_CLOSE, payload)
end

-- Copies session_data into apm, which hands it to the instance that takes
-- this session over in a restart (worker option session_persist).
function ApmSession:save_session_data()
  if not self._open then return false end
  local module = self._module
  local json = cjson.encode(self.session_data)
  if #json > module._session_data_max then
    error(('save_session_data(): session_data is %d bytes as JSON; apm keeps at most %d per session'):format(#json, module._session_data_max), 2)
  end
  module:_send(K_SAVE, self.session_id, json)
  return true
end

-- The connector's side.

function ApmSession:_enqueue(kind, payload)
  self._queue_tail = self._queue_tail + 1
  self._queue[self._queue_tail] = { kind, payload, 0 }
  self:_pump()
end

-- Moves queued writes to the channel as far as credit allows.
function ApmSession:_pump()
  local module = self._module
  local queue = self._queue
  while self._open and queue[self._queue_head] do
    local entry = queue[self._queue_head]
    local kind, payload, offset = entry[1], entry[2], entry[3]
    if kind == K_HEAD or kind == K_CLOSE or kind == K_HANDED then
      module:_send(kind, self.session_id, payload)
      queue[self._queue_head] = nil
      self._queue_head = self._queue_head + 1
      if kind ~= K_HEAD then self:_forget() end
    else
      local left = #payload - offset
      local room = math.min(module._max_frame, self._credit)
      if left <= room then
        module:_send(kind, self.session_id, offset > 0 and payload:sub(offset + 1) or payload)
        self._credit = self._credit - left
        queue[self._queue_head] = nil
        self._queue_head = self._queue_head + 1
      else
        -- Too big for one frame now: send the part credit allows. A
        -- WebSocket message goes out as `more` fragments so that apm
        -- reassembles it; bytes of a stream need no such marking.
        if kind == K_TEXT then
          while room > 0 and (payload:byte(offset + room + 1) & 0xC0) == 0x80 do room = room - 1 end
        end
        if room <= 0 then return end
        local lead = (self.protocol == 'ws' and kind ~= K_RAW) and K_MORE or kind
        module:_send(lead, self.session_id, payload:sub(offset + 1, offset + room))
        self._credit = self._credit - room
        entry[3] = offset + room
      end
    end
  end
end

function ApmSession:_forget()
  self._open = false
  self._closing = true
  self._queue = {}
  self._queue_head = 1
  self._queue_tail = 0
  self._partial = {}
  self._module._sessions[self.session_id] = nil
end

-- apm moves the session to another instance: what the app queued goes out,
-- then `handed`, and later writes are dropped.
function ApmSession:_hand_off()
  if self._closing then return end -- the app's close is on its way and ends the session instead
  self._closing = true
  self:_enqueue(K_HANDED, '')
end

-- An app callback raised: end the session the way the client understands best.
function ApmSession:_failed()
  if self._closing then return end
  if self.protocol == 'http' and not self._started then
    self:write('Internal Server Error\n', { ['x-status'] = '500', ['content-type'] = 'text/plain' })
  end
  if self.protocol == 'ws' then
    self:close(1011, 'internal error')
  else
    self:close()
  end
end

-- The app's callbacks run as coroutines of the connector, so that a
-- request() in one waits for its result by yielding while the loop serves
-- the rest (libuv's loop cannot be run again from inside its callbacks).
local app_threads = setmetatable({}, { __mode = 'k' })

local function resume(thread, ...)
  local ok, err = coroutine.resume(thread, ...)
  if not ok then io.stderr:write('apm_module: ' .. tostring(err) .. '\n') end
end

-- Coroutines whose callback returned wait here for the next one, so that a
-- callback does not cost a coroutine's creation and collection.
local idle_threads = {}

local function run_callbacks(on_error, fn, ...)
  local ok, err = xpcall(fn, debug.traceback, ...)
  if not ok then on_error(err) end
  idle_threads[#idle_threads + 1] = coroutine.running()
  return run_callbacks(coroutine.yield()) -- a tail call: the stack does not grow
end

-- Runs fn(...) as such a coroutine; on_error(traceback) if it raises, now
-- or after a wait.
local function spawn(on_error, fn, ...)
  local thread = table.remove(idle_threads)
  if thread == nil then
    thread = coroutine.create(run_callbacks)
    app_threads[thread] = true
  end
  resume(thread, on_error, fn, ...)
end

local ApmModule = {}
ApmModule.__index = ApmModule

-- ---- IPC between workers (feature "ipc", kinds 32-47; docs/connector-protocol.md) ----

local K_IPC_SEND, K_IPC_REQUEST, K_IPC_MESSAGE, K_IPC_REPLY, K_IPC_RESULT = 32, 33, 34, 35, 36
local K_STREAM_OPEN, K_STREAM_OFFER, K_STREAM_ACCEPT, K_STREAM_JOIN = 37, 38, 39, 40
local K_STREAM_DATA, K_STREAM_CLOSE, K_DASH, K_METRIC = 41, 42, 43, 44
-- Ids this side picks; apm's have the high bit set.
local MAX_OWN_ID = 0x7fffffff
local IPC_RECEIVED = {
  [K_IPC_MESSAGE] = true, [K_IPC_RESULT] = true, [K_STREAM_OFFER] = true, [K_STREAM_JOIN] = true,
  [K_STREAM_DATA] = true, [K_STREAM_CLOSE] = true,
}
local METRIC_TYPES = { counter = true, gauge = true, timing = true }

-- Debian's lua-cjson (2.1.0) writes every empty table as {}: a table the app
-- marks with ApmModule.array(t) is a list, [] when empty, in IPC data.
local ARRAY = {}
local arrays_used = false
local EMPTY_ARRAY_TEXT = '\0apm_module:[]'

local function with_empty_arrays(v)
  if type(v) ~= 'table' then return v end
  if getmetatable(v) == ARRAY and next(v) == nil then return EMPTY_ARRAY_TEXT end
  local copy = {}
  for k, x in pairs(v) do copy[k] = with_empty_arrays(x) end
  return copy
end

--[[ One IPC stream: the app's end of it, as the mediator (from
apm:request_stream) or as a peer (given to apm.on_stream, which takes the
offer with stream:accept() and declines it with stream:close(); until then
it neither hears nor writes). Fields: channel, head, peer_id (a peer's own
id; nil for the mediator), peers (the mediator's); the app sets on_data
(function(data, is_binary, peer_id)), on_join and on_leave
(function(peer_id), the mediator's peers after the first) and on_close
(the stream is over; not after the app's own close()). Writes to a closed
stream are dropped. ]]
local ApmStream = {}
ApmStream.__index = ApmStream

local function new_stream(module, id, channel, head, peer)
  return setmetatable({
    channel = channel, head = head, peer_id = peer, peers = {},
    _module = module, _id = id, _open = true,
    _joined = false,          -- mediator: the first peer came
    _accepted = peer == nil,  -- a peer took the offer
  }, ApmStream)
end

-- A peer takes the offer.
function ApmStream:accept()
  if self._open and not self._accepted then
    self._accepted = true
    self._module:_send(K_STREAM_ACCEPT, self._id, '')
  end
  return self
end

function ApmStream:_write(peer, data, binary)
  if not (self._open and self._accepted) then return false end
  data = data == nil and '' or tostring(data)
  if not binary and not utf8.len(data) then
    error('a stream text message must be UTF-8; write(data, true) sends bytes', 3)
  end
  local max = self._module._max_frame - 5
  if #data > max then error(('a stream write is at most %d bytes'):format(max), 3) end
  self._module:_send(K_STREAM_DATA, self._id, string.pack('>I4B', peer, binary and 0 or 1) .. data)
  return true
end

-- The mediator writes to every peer, a peer to the mediator: a text message
-- (UTF-8), or bytes when is_binary is true.
function ApmStream:write(data, is_binary)
  return self:_write(0, data, is_binary == true)
end

-- The mediator writes to one peer.
function ApmStream:write_to(peer, data, is_binary)
  if self.peer_id ~= nil then error('only the mediator of a stream writes to one peer', 2) end
  return self:_write(peer, data, is_binary == true)
end

-- The mediator ends the stream; a peer leaves it (or declines it, in on_stream).
function ApmStream:close()
  if not self._open then return end
  self._module:_forget_stream(self)
  self._module:_send(K_STREAM_CLOSE, self._id, string.pack('>I4', 0))
end

-- Waits for what resume_waiter() hands over: yields an app coroutine, or
-- runs the loop at the top level.
function ApmModule:_wait(key)
  local thread = coroutine.running()
  if app_threads[thread] then
    self._waiters[key] = thread
    return coroutine.yield()
  end
  if self._dispatching then
    error('request() and request_stream() wait only in the connector\'s callbacks or the main chunk', 3)
  end
  self._waiters[key] = false
  while self._handed[key] == nil do uv.run('once') end
  local box = self._handed[key]
  self._handed[key] = nil
  return box[1]
end

function ApmModule:_resume_waiter(key, value)
  local waiter = self._waiters[key]
  if waiter == nil then return end
  self._waiters[key] = nil
  if waiter then
    resume(waiter, value)
  else
    self._handed[key] = { value }
  end
end

-- Broadcasts data (any JSON value) to every process listening on channel.
function ApmModule:send(channel, data)
  self:_send_json(K_IPC_SEND, 0, { channel = tostring(channel), data = data })
end

--[[ Sends data to the listeners of channel and returns the first reply's
data, or nil (no listener, timeout, none replied). timeout_ms: this call's
timeout, else the worker's ipc_timeout, else 500 ms. The connector keeps
serving meanwhile. ]]
function ApmModule:request(channel, data, timeout_ms)
  local id = self:_own_id()
  self:_send_json(K_IPC_REQUEST, id, { channel = tostring(channel), data = data,
    timeout_ms = timeout_ms and math.floor(timeout_ms) or cjson.null })
  return self:_wait(id)
end

--[[ Opens a stream on channel, head for the listeners to judge it, and
returns it once the first peer joined, or nil when none did. Waits as
request() does. ]]
function ApmModule:request_stream(channel, head, timeout_ms)
  local id = self:_own_id()
  local stream = new_stream(self, id, tostring(channel), head, nil)
  self:_send_json(K_STREAM_OPEN, id, { channel = tostring(channel), head = head == nil and cjson.null or head,
    timeout_ms = timeout_ms and math.floor(timeout_ms) or cjson.null })
  self._streams[id] = stream
  return self:_wait(id)
end

-- A value for the dashboard's panel id (any JSON value, a color such as '#4f8cff').
function ApmModule:set_dash_value(id, value, color)
  self:_send_json(K_DASH, 0, { id = id, value = value == nil and cjson.null or value,
    color = color == nil and cjson.null or tostring(color) })
end
ApmModule.setDashValue = ApmModule.set_dash_value

-- A StatsD-style metric: type 'counter' (added up, the default), 'gauge' or 'timing'.
function ApmModule:metric(name, value, metric_type)
  metric_type = metric_type or 'counter'
  if type(value) ~= 'number' or value ~= value or value == math.huge or value == -math.huge then
    error(('metric %s: the value must be a finite number'):format(name), 2)
  end
  if not METRIC_TYPES[metric_type] then
    error(('metric %s: the type is counter, gauge or timing, not %s'):format(name, tostring(metric_type)), 2)
  end
  self:_send_json(K_METRIC, 0, { name = tostring(name), value = value, type = metric_type })
end

function ApmModule.array(t)
  arrays_used = true
  return setmetatable(t or {}, ARRAY)
end

function ApmModule:_send_json(kind, id, fields)
  local ok, json = pcall(cjson.encode, arrays_used and with_empty_arrays(fields) or fields)
  if not ok then error('IPC data must be JSON: ' .. tostring(json), 3) end
  if arrays_used then json = json:gsub('"\\u0000apm_module:%[%]"', '[]') end
  if #json > self._max_frame then
    error(('an IPC message is at most %d bytes of JSON'):format(self._max_frame), 3)
  end
  self:_ensure_ready()
  self:_send(kind, id, json)
end

function ApmModule:_own_id()
  local id = self._last_own_id
  repeat id = id % MAX_OWN_ID + 1 until self._waiters[id] == nil and self._streams[id] == nil
  self._last_own_id = id
  return id
end

function ApmModule:_forget_stream(stream)
  stream._open = false
  self._streams[stream._id] = nil
end

local function ipc_json(payload, kind)
  local ok, fields = pcall(cjson.decode, payload)
  if not ok or type(fields) ~= 'table' then
    protocol_error(('kind %d: the payload is not a JSON object'):format(kind))
  end
  return fields
end

-- JSON null is nil to the app.
local function value_of(v)
  if v == cjson.null then return nil end
  return v
end

-- Calls an app callback outside a session; false when it raised at once.
function ApmModule:_call_app(name, fn, ...)
  if fn == nil then return true end
  local failed = false
  spawn(function(err)
    failed = true
    io.stderr:write(('apm_module: uncaught error in %s: %s\n'):format(name, tostring(err)))
  end, fn, ...)
  return not failed
end

function ApmModule:_dispatch_ipc(kind, id, payload)
  if kind == K_IPC_MESSAGE then
    local message = ipc_json(payload, kind)
    local reply
    if id ~= 0 then
      local replied = false
      reply = function(data)
        if replied then return end
        replied = true
        self:_send_json(K_IPC_REPLY, id, { data = data == nil and cjson.null or data })
      end
    end
    local channel = type(message.channel) == 'string' and message.channel or ''
    local on_channel = self.on_channel
    -- What it returns answers a request it did not reply to.
    self:_call_app('on_channel', on_channel and function(...)
      local answer = on_channel(...)
      if answer ~= nil and reply then reply(answer) end
    end, channel, value_of(message.data), reply)
    return
  end
  if kind == K_IPC_RESULT then
    local result = ipc_json(payload, kind)
    self:_resume_waiter(id, result.status == 'reply' and value_of(result.data) or nil)
    return
  end
  if kind == K_STREAM_OFFER then return self:_offered(id, ipc_json(payload, kind)) end
  if #payload < 4 then
    protocol_error(('kind %d with %d bytes, fewer than a peer id'):format(kind, #payload))
  end
  local peer = string.unpack('>I4', payload)
  local stream = self._streams[id]
  if stream == nil then return end -- it ended; frames may cross a close on the wire
  if kind == K_STREAM_JOIN then
    stream.peers[#stream.peers + 1] = peer
    if stream._joined then
      self:_call_app('on_join', stream.on_join, peer)
    else
      stream._joined = true
      self:_resume_waiter(id, stream) -- the answer to request_stream
    end
  elseif kind == K_STREAM_DATA then
    if #payload < 5 then protocol_error('stream_data without its type') end
    local binary = payload:byte(5) == 0
    local data = payload:sub(6)
    if not binary and not utf8.len(data) then
      protocol_error(('stream %d: a text message that is not UTF-8'):format(id))
    end
    if stream._accepted then self:_call_app('on_data', stream.on_data, data, binary, stream.peer_id or peer) end
  elseif peer ~= 0 and stream.peer_id == nil then
    for i, p in ipairs(stream.peers) do
      if p == peer then table.remove(stream.peers, i) break end
    end
    self:_call_app('on_leave', stream.on_leave, peer)
  else
    self:_forget_stream(stream)
    if stream.peer_id ~= nil and stream._accepted then
      self:_call_app('on_close', stream.on_close)
    elseif stream._joined then
      self:_call_app('on_close', stream.on_close)
    else
      self:_resume_waiter(id, nil) -- refused: request_stream gives nil
    end
  end
end

function ApmModule:_offered(peer, offer)
  local stream = new_stream(self, peer, type(offer.channel) == 'string' and offer.channel or '', value_of(offer.head), peer)
  self._streams[peer] = stream
  if self.on_stream == nil or not self:_call_app('on_stream', self.on_stream, stream) then
    stream:close() -- declined
  end
end

-- ---- end of IPC ----

--[[ Checks the environment and greets apm. on_connect(session) is called
for each new session; fields worker and instance_id come from apm's hello. ]]
function ApmModule.new(on_connect)
  if os.getenv('APM') ~= '1' then die('start this app with apm run (APM is not set)') end
  local fd_text = os.getenv('APM_FD')
  if fd_text == nil or fd_text == '' then
    die('this worker has no connector channel: give it server lines and upstream connector (APM_FD is not set)')
  end
  local fd = fd_text:match('^%d+$') and tonumber(fd_text)
  if not fd then die('APM_FD=' .. fd_text .. ' is not a usable channel: not a descriptor number') end
  local pipe = uv.new_pipe(false)
  local ok, err = pipe:open(fd)
  if not ok then die('APM_FD=' .. fd_text .. ' is not a usable channel: ' .. tostring(err)) end
  local self = setmetatable({
    on_connect = on_connect,
    worker = nil,
    instance_id = nil,
    _pipe = pipe,
    _max_frame = DEFAULT_MAX_FRAME,
    _window = DEFAULT_WINDOW,
    _session_data_max = DEFAULT_SESSION_DATA_MAX,
    _sessions = {},
    _greeted = false,
    _inbuf = '',        -- joined bytes, read from _inpos on
    _inpos = 1,
    _pending = {},      -- chunks read after _inbuf, joined when a frame needs them
    _pending_bytes = 0,
    _out = {},          -- frames waiting for the next flush
    _ready_sent = false,
    on_channel = nil,   -- function(channel, data, reply): a message on a channel the worker listens on
    on_stream = nil,    -- function(stream): a stream offered on such a channel; accepted unless closed there
    _streams = {},      -- IPC streams by id
    _waiters = {},      -- request or stream id -> the coroutine waiting (false: the main chunk)
    _handed = {},       -- what a wait of the main chunk got, boxed
    _last_own_id = 0,
    _dispatching = false,
  }, ApmModule)
  -- A write to a daemon that went away is an error to handle, not a
  -- SIGPIPE; a caught signal (unlike an ignored one) is reset for programs
  -- the app executes.
  uv.new_signal():start('sigpipe', function() end)
  -- Frames of one loop turn go out in one write, before the loop waits.
  uv.new_prepare():start(function() self:_flush() end)
  pipe:read_start(function(read_err, chunk)
    if read_err or not chunk then os.exit(0) end -- apm closed the channel: it is stopping this instance
    self._pending[#self._pending + 1] = chunk
    self._pending_bytes = self._pending_bytes + #chunk
    self._dispatching = true
    self:_parse()
    self._dispatching = false
  end)
  -- apm writes hello as soon as the process starts, so waiting here is
  -- short; it makes instance_id available before run().
  while not self._greeted do uv.run('once') end
  return self
end

setmetatable(ApmModule, { __call = function(_, on_connect) return ApmModule.new(on_connect) end })

-- Serves sessions (and IPC) until apm closes the channel. Does not return.
-- A worker without server lines may run without a handler.
function ApmModule:run()
  self:_ensure_ready()
  while true do uv.run('default') end
end

-- Says `ready` once: from run(), or from the first IPC call before it.
function ApmModule:_ensure_ready()
  if self._ready_sent then return end
  self._ready_sent = true
  local ready = {
    protocol = PROTOCOL,
    connector = 'lua ' .. _VERSION:match('[%d.]+$'),
    half_close = true,
    features = { 'migrate', 'ipc' },
  }
  self:_send(K_READY, 0, cjson.encode(ready))
end

-- The channel.

function ApmModule:_send(kind, session, payload)
  local out = self._out
  out[#out + 1] = string.pack('>I4BI4', 5 + #payload, kind, session)
  if #payload > 0 then out[#out + 1] = payload end
end

function ApmModule:_flush()
  if #self._out == 0 then return end
  local out = self._out
  self._out = {}
  self._pipe:write(out, function(err)
    if err then os.exit(0) end -- apm is gone; it restarts or stops us anyway
  end)
end

-- Makes the first `size` unread bytes contiguous in _inbuf.
function ApmModule:_join(size)
  if #self._inbuf - self._inpos + 1 >= size then return end
  local parts = self._pending
  table.insert(parts, 1, self._inbuf:sub(self._inpos))
  self._inbuf = table.concat(parts)
  self._inpos = 1
  self._pending = {}
  self._pending_bytes = 0
end

function ApmModule:_parse()
  -- The position lives in the module: a callback may pump the loop (IPC)
  -- and parse the frames after its own.
  while true do
    local available = #self._inbuf - self._inpos + 1 + self._pending_bytes
    if available < 4 then return end
    self:_join(4)
    local length = string.unpack('>I4', self._inbuf, self._inpos)
    -- Checked before waiting for the rest: a bad length must not make us
    -- buffer gigabytes.
    if length < 5 or length > 5 + self._max_frame then
      protocol_error(('a frame of %d bytes (the limit is %d)'):format(length, 5 + self._max_frame))
    end
    if available - 4 < length then return end
    self:_join(4 + length)
    local pos = self._inpos
    local kind, session = string.unpack('>BI4', self._inbuf, pos + 4)
    local payload = self._inbuf:sub(pos + 9, pos + 3 + length)
    self._inpos = pos + 4 + length
    if self._greeted then
      self:_dispatch(kind, session, payload)
    else
      self:_hello(kind, session, payload)
    end
  end
end

function ApmModule:_hello(kind, session, payload)
  if kind ~= K_HELLO or session ~= 0 then
    protocol_error(('the first frame is kind %d, not hello'):format(kind))
  end
  local ok, hello = pcall(cjson.decode, payload)
  if not ok or type(hello) ~= 'table' or hello.protocol == nil then
    protocol_error('hello is not a JSON object with a protocol')
  end
  if hello.protocol ~= PROTOCOL then
    die(('this connector speaks protocol %d, apm speaks %s; update apm_module'):format(
      PROTOCOL, cjson.encode(hello.protocol)))
  end
  local function integer(v, default)
    return type(v) == 'number' and math.tointeger(v) or default
  end
  self.worker = field(hello, 'worker', 'string')
  self.instance_id = integer(hello.instance_id, nil)
  self._max_frame = integer(hello.max_frame, DEFAULT_MAX_FRAME)
  self._window = integer(hello.window, DEFAULT_WINDOW)
  self._session_data_max = integer(hello.session_data_max, DEFAULT_SESSION_DATA_MAX)
  self._greeted = true
end

function ApmModule:_dispatch(kind, session_id, payload)
  if IPC_RECEIVED[kind] then return self:_dispatch_ipc(kind, session_id, payload) end
  if not RECEIVED[kind] then protocol_error(('kind %d is not for a connector to receive'):format(kind)) end
  if session_id == 0 then protocol_error(('kind %d on the channel instead of a session'):format(kind)) end
  if kind == K_OPEN then return self:_open_session(session_id, payload) end
  local session = self._sessions[session_id]
  if session == nil then return end -- it ended; frames may cross a close on the wire
  if kind == K_CREDIT then
    if #payload ~= 4 then protocol_error(('a credit of %d bytes'):format(#payload)) end
    session._credit = session._credit + string.unpack('>I4', payload)
    session:_pump()
  elseif kind == K_CLOSE then
    if #payload == 1 then protocol_error('a close of one byte') end
    local code = #payload >= 2 and string.unpack('>I2', payload) or 0
    local reason = payload:sub(3)
    local app_closed = session._closing
    session:_forget()
    if not app_closed then self:_call(session, 'on_close', code, reason) end
  elseif kind == K_END then
    if session._closing then return end
    if session.on_end == nil and session.protocol == 'tcp' then
      -- As a socket that does not allow half-open connections: the client
      -- is done, so is the session, once its answer is out.
      session:close()
    else
      self:_call(session, 'on_end')
    end
  elseif kind == K_MIGRATE then
    session:_hand_off()
  else
    self:_receive(session, kind, payload)
  end
end

function ApmModule:_open_session(session_id, payload)
  if self._sessions[session_id] then
    protocol_error(('open for session %d, which is open'):format(session_id))
  end
  local ok, head = pcall(cjson.decode, payload)
  if not ok or type(head) ~= 'table' then protocol_error('open is not a JSON object') end
  local session = new_session(self, session_id, head)
  self._sessions[session_id] = session
  if self.on_connect == nil then
    io.stderr:write(('apm_module: session %d: the app gave ApmModule no session handler\n'):format(session_id))
    session:_failed()
    return
  end
  self:_call(session, nil, session)
end

function ApmModule:_receive(session, kind, payload)
  local size = #payload
  session._allowance = session._allowance - size
  if session._allowance < 0 then
    protocol_error(('session %d: data beyond the window'):format(session.session_id))
  end
  if session._closing then return end -- the app has answered; nobody wants the rest
  if session.protocol == 'ws' then
    local partial = session._partial
    if kind == K_MORE then
      -- apm sends the rest of a big message only as credit comes back, so
      -- fragments are credited as soon as they are buffered.
      partial[#partial + 1] = payload
      self:_give_credit(session, size)
      return
    end
    local message = payload
    if #partial > 0 then
      partial[#partial + 1] = payload
      message = table.concat(partial)
      session._partial = {}
    end
    if kind == K_TEXT and not utf8.len(message) then
      protocol_error(('session %d: a text message that is not UTF-8'):format(session.session_id))
    end
    self:_call(session, 'on_data', message, kind == K_DATA)
  else
    -- A byte stream: `more` fragments are just bytes, passed on as they come.
    self:_call(session, 'on_data', payload, true)
  end
  -- Consumed once the app's callback has returned.
  self:_give_credit(session, size)
end

function ApmModule:_give_credit(session, size)
  if size > 0 and session._open then
    session._allowance = session._allowance + size
    self:_send(K_CREDIT, session.session_id, string.pack('>I4', size))
  end
end

-- Calls the app's handler (callback nil) or one of the session's callbacks.
function ApmModule:_call(session, callback, ...)
  local fn
  if callback == nil then fn = self.on_connect else fn = session[callback] end
  if fn == nil then return end
  spawn(function(err)
    -- The app's bug ends its session, not the instance.
    io.stderr:write(('apm_module: session %d: uncaught error in %s: %s\n'):format(
      session.session_id, callback or 'the session handler', tostring(err)))
    session:_failed()
  end, fn, ...)
end

ApmModule.ApmSession = ApmSession
ApmModule.PROTOCOL = PROTOCOL
ApmModule.decode = decode

return ApmModule
