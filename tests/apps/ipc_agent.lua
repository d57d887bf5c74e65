-- The IPC test agent of tests/apps/ipc_agent.py (tests/it/ipc.rs), in Lua:
-- the same commands on its control channel `ctl.<AGENT>`, the same environment.

local here = arg[0]:match('^(.*)/[^/]*$') or '.'
package.path = here .. '/../../connectors/?.lua;' .. package.path

local ApmModule = require('apm_module')
local cjson = require('cjson')
local uv = require('luv')

io.stdout:setvbuf('line')
local name = os.getenv('AGENT')
local delay = os.getenv('REPLY_DELAY_MS')
local inbox = {}
local current

local apm = ApmModule.new(function(s)
  s:write('agent ' .. name)
  s:close()
end)

local function track(s)
  current = s
  s.on_data = function(data, is_binary, peer)
    inbox[#inbox + 1] = { ev = 'data', data = data, peer = s.peer_id == nil and peer or cjson.null }
  end
  s.on_close = function() inbox[#inbox + 1] = { ev = 'close' } end
  s.on_join = function(peer) inbox[#inbox + 1] = { ev = 'join', peer = peer } end
  s.on_leave = function(peer) inbox[#inbox + 1] = { ev = 'leave', peer = peer } end
end

local commands = {
  send = function(c) apm:send(c.channel, c.data) return 'sent' end,
  request = function(c)
    local started = uv.hrtime()
    local data = apm:request(c.channel, c.data, c.timeout)
    return { data = data == nil and cjson.null or data, ms = (uv.hrtime() - started) / 1e6 }
  end,
  inbox = function()
    local taken = inbox
    inbox = {}
    return ApmModule.array(taken)
  end,
  open = function(c)
    local s = apm:request_stream(c.channel, c.head, c.timeout)
    if s == nil then return { ok = false } end
    track(s)
    return { ok = true }
  end,
  write = function(c) return current ~= nil and current:write(c.data) end,
  close = function()
    if current then current:close() end
    return 'closed'
  end,
}

apm.on_channel = function(channel, data, reply)
  if channel == 'ctl.' .. name then return commands[data['do']](data) end
  inbox[#inbox + 1] = { ev = 'msg', channel = channel, data = data == nil and cjson.null or data }
  if reply and delay then
    -- Said before the wait, so a test knows the request is pending here.
    print(('agent %s: answering in %s ms'):format(name, delay))
    uv.sleep(tonumber(delay))
    return { from = name }
  end
end
apm.on_stream = function(s)
  inbox[#inbox + 1] = { ev = 'offer', peer = s.peer_id, head = s.head == nil and cjson.null or s.head }
  if os.getenv('ACCEPT_STREAMS') then
    track(s:accept())
  else
    s:close()
  end
end
apm:run()
