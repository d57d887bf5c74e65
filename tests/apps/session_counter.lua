-- The session hand-off test app (tests/it/sessions.rs), Lua flavour; it
-- behaves as session_counter.py: each counter must be the last one plus 1,
-- and the answer carries the running total, whichever instance gives it.

local here = arg[0]:match('^(.*)/[^/]*$') or '.'
package.path = here .. '/../../connectors/?.lua;' .. package.path

local ApmModule = require('apm_module')
local uv = require('luv')

local pid = uv.os_getpid()

local function serve(s)
  if s.protocol == 'http' then
    s:write(('ok %d\n'):format(pid), { ['content-type'] = 'text/plain' })
    s:close()
    return
  end
  if not s.migrated then s.session_data = { last = 0, total = 0, rest = '' } end
  local function answer(text)
    s:write(s.protocol == 'tcp' and text .. '\n' or text)
  end
  local function take(word)
    local d = s.session_data
    if word == 'big' then
      local kept = d.blob
      d.blob = string.rep('x', 100000)
      local ok, err = pcall(s.save_session_data, s)
      answer(ok and 'big: saved' or 'big: ' .. tostring(err))
      d.blob = kept
      return
    end
    if not word:find('^%d+$') or tonumber(word) ~= d.last + 1 then
      answer(('gap %d %s'):format(d.last, word))
      return
    end
    d.last = math.tointeger(tonumber(word))
    d.total = math.tointeger(d.total + d.last)
    answer(('%d %d %d'):format(d.last, d.total, pid))
  end
  s.on_data = function(data)
    local d = s.session_data
    if s.protocol == 'ws' then
      take(data)
    else
      local text = d.rest .. data
      local start = 1
      for stop in function() return text:find('\n', start, true) end do
        take(text:sub(start, stop - 1))
        start = stop + 1
      end
      d.rest = text:sub(start)
    end
    s:save_session_data()
  end
end

local never = os.getenv('NEVER_READY')
if never and io.open(never) then
  while true do uv.sleep(1000) end
end
ApmModule.new(serve):run()
