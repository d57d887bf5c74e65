-- The shared connector test app ("connector_echo"), Lua flavour.
--
-- Same behaviour in every language; see tests/connectors/conformance.py,
-- which drives it as apm's daemon would.

local here = arg[0]:match('^(.*)/[^/]*$') or '.'
package.path = here .. '/../../connectors/?.lua;' .. package.path

local ApmModule = require('apm_module')
local cjson = require('cjson')

io.stdout:setvbuf('line')

local function serve_http(s)
  -- A line per request on stdout: it must reach the log, not the channel.
  print(('connector_echo: %s %s'):format(s.method, s.path))
  s.session_data.body_length = 0

  if s.path == '/throw' then error('connector_echo: thrown on purpose') end
  if s.path == '/bad-header' then
    s:write('no', { ['x-status'] = '200', ['x-bad'] = 'a\r\nb' }) -- raises
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
    elseif not is_binary and data == 'save' then
      s.session_data.saved = 'yes'
      s:save_session_data()
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

ApmModule.new(function(s)
  if s.protocol == 'ws' then
    serve_ws(s)
  elseif s.protocol == 'tcp' then
    serve_tcp(s)
  else
    serve_http(s)
  end
end):run()
