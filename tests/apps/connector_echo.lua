-- The shared connector test app ("connector_echo"), Lua flavour.
--
-- Same behaviour in every language; see tests/connectors/conformance.py,
-- which drives it as apm's daemon would.

local here = arg[0]:match('^(.*)/[^/]*$') or '.'
package.path = here .. '/../../connectors/?.lua;' .. package.path

local ApmModule = require('apm_module')
local cjson = require('cjson')

io.stdout:setvbuf('line')

local apm

-- IPC, as tests/connectors/conformance.py expects it (its IPC section).
local function serve_ipc(s)
  local json = { ['x-status'] = '200', ['content-type'] = 'application/json' }
  if s.path == '/ipc/request' then
    local ms = s.query_object.ms and tonumber(s.query_object.ms)
    local result = apm:request('ask', { q = 1 }, ms)
    s:write(cjson.encode({ result = result == nil and cjson.null or result }), json)
  elseif s.path == '/ipc/send' then
    apm:send('news', { n = 1 })
    s:write('sent', { ['x-status'] = '200', ['content-type'] = 'text/plain' })
  elseif s.path == '/ipc/dash' then
    apm:setDashValue('load', 42.5, '#4f8cff')
    apm:metric('hits', 3, 'counter')
    s:write('ok', { ['x-status'] = '200', ['content-type'] = 'text/plain' })
  elseif s.path == '/ipc/stream' then
    local stream = apm:request_stream('feed', { from = 'lua' }, 300)
    if stream == nil then
      s:write(cjson.encode({ stream = cjson.null }), json)
    else
      stream:write('to all')
      stream:write_to(stream.peers[1], '\0\1', true)
      stream.on_join = function(peer) stream:write_to(peer, 'welcome') end
      stream.on_data = function(data, is_binary, peer)
        if data == 'bye' then
          stream:close()
        else
          stream:write_to(peer, 'got ' .. data)
        end
      end
      stream.on_leave = function(peer) apm:send('left', peer) end
      s:write(cjson.encode({ stream = stream.channel, peers = stream.peers }), json)
    end
  end
  s:close()
end

local function serve_http(s)
  -- A line per request on stdout: it must reach the log, not the channel.
  print(('connector_echo: %s %s'):format(s.method, s.path))
  s.session_data.body_length = 0

  if s.path == '/throw' then error('connector_echo: thrown on purpose') end
  if s.path == '/bad-header' then
    s:write('no', { ['x-status'] = '200', ['x-bad'] = 'a\r\nb' }) -- raises
    return
  end
  if s.path:find('^/ipc/') then
    s.on_end = function() serve_ipc(s) end
    return
  end

  if s.path == '/echo' then
    local headers = { ['x-status'] = '200', ['content-type'] = 'application/octet-stream' }
    s.on_data = function(chunk) s:write(chunk, headers) end
    s.on_end = function()
      s:write('', headers) -- sends the head if the body was empty
      s:close()
    end
    return
  end

  s.on_data = function(chunk) s.session_data.body_length = s.session_data.body_length + #chunk end
  s.on_end = function()
    local status = s.path:match('^/status/(.*)$')
    if status then
      s:write('status ' .. status, { ['x-status'] = status, ['content-type'] = 'text/plain' })
    elseif s.path == '/cookies' then
      s:write('ok', { ['x-status'] = '200', ['content-type'] = 'text/plain', ['set-cookie'] = { 'a=1', 'b=2' } })
    else
      s:write(cjson.encode({
        lang = 'lua',
        method = s.method,
        path = s.path,
        path_array = s.path_array,
        query = s.query,
        query_object = s.query_object,
        headers = s.headers,
        cookies = s.cookies,
        remote_ip = s.remote_ip,
        session_id = s.session_id,
        instance_id = s.instance_id,
        client_subject = s.client_subject,
        tls = s.tls,
        pid = tonumber(io.open('/proc/self/stat'):read('*l'):match('^%d+')),
        body_length = s.session_data.body_length,
        env_index = os.getenv('APM_INDEX'),
      }), { ['x-status'] = '200', ['content-type'] = 'application/json' })
    end
    s:close()
  end
end

local function serve_ws(s)
  s.on_data = function(data, is_binary)
    if not is_binary and data == 'close' then
      s:close(4000, 'bye')
    elseif not is_binary and data == 'throw' then
      error('connector_echo: thrown on purpose')
    elseif not is_binary and data:sub(1, 5) == 'save ' then
      -- session hand-off: "save <json>" keeps it as session_data in apm
      s.session_data = cjson.decode(data:sub(6))
      local ok, why = pcall(s.save_session_data, s)
      if ok then s:write('saved') else s:write('refused: ' .. tostring(why)) end
    elseif not is_binary and data == 'data?' then
      s:write(cjson.encode({ migrated = s.migrated, session_data = s.session_data }))
    elseif not is_binary and data == 'raw' then
      s:write_raw('\x81\x04raw!')
    else
      s:write(data, is_binary) -- text back as text, binary as binary
    end
  end
  s.on_close = function() end
end

local function serve_tcp(s)
  s.on_data = function(data)
    s:write(data)
    if data:sub(-5) == 'quit\n' then s:close() end
  end
  s.on_end = function()
    -- The client half-closed: it still gets the rest of the answer.
    s:write('bye\n')
    s:close()
  end
end

apm = ApmModule.new(function(s)
  if s.protocol == 'ws' then
    serve_ws(s)
  elseif s.protocol == 'tcp' then
    serve_tcp(s)
  else
    serve_http(s)
  end
end)
apm.on_channel = function(channel, data, reply)
  if reply then
    return { lang = 'lua', channel = channel, echo = data } -- answers the request
  end
  apm:send('echoed', { channel = channel, echo = data })
end
apm.on_stream = function(stream)
  if type(stream.head) == 'table' and stream.head.decline then
    stream:close()
    return
  end
  stream:accept():write('hello ' .. stream.channel)
  stream.on_data = function(data, is_binary)
    if not is_binary and data == 'leave' then
      stream:close()
    else
      stream:write(data, is_binary)
    end
  end
  stream.on_close = function() apm:send('stream-closed', stream.peer_id) end
end
if os.getenv('CONNECTOR_ECHO_BOOT') == '1' then
  apm:send('booted', apm:request('boot', { lang = 'lua' }))
end
apm:run()
