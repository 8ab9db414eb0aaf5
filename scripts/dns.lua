-- dns.lua: DNS latency over UDP computed in Lua, reported through tcpkit.record so that it
-- shows in the stats JSON and the slow log like a native protocol, with the C tool's bit32.
-- Usage: tcpkit -p 53 -u -m raw -S scripts/dns.lua [-t MS]

local pending = {}

local function u16(s, i)
  return s:byte(i) * 256 + s:byte(i + 1)
end

-- The first question's name, from byte 13 (labels; compression does not occur there).
local function qname(s)
  local labels, i = {}, 13
  while i <= #s do
    local len = s:byte(i)
    if len == 0 or len >= 64 then break end
    labels[#labels + 1] = s:sub(i + 1, i + len)
    i = i + 1 + len
  end
  return table.concat(labels, ".") .. "."
end

-- pending[client address][client port * 65536 + id] = { us, query payload }
function process(p)
  if p.size < 12 then return end
  local payload = p.payload
  local id = u16(payload, 1)
  local flags = u16(payload, 3)
  local response = bit32.rshift(flags, 15) == 1
  local now = p.tv_sec * 1000000 + p.tv_usec
  if p.request and not response then
    local by_client = pending[p.sip]
    if not by_client then
      by_client = {}
      pending[p.sip] = by_client
    end
    local key = p.sport * 65536 + id
    if not by_client[key] then
      by_client[key] = { now, payload }
    end
  elseif not p.request and response then
    local by_client = pending[p.dip]
    local key = p.dport * 65536 + id
    local query = by_client and by_client[key]
    if query then
      by_client[key] = nil
      local rcode = bit32.band(flags, 15)
      tcpkit.record {
        port = p.sport,
        latency_us = now - query[1],
        command = "QUERY",
        summary = qname(query[2]) .. " rcode " .. rcode,
        client = p.dip .. ":" .. p.dport,
        server = p.sip .. ":" .. p.sport,
        status = (rcode == 0 or rcode == 3) and "ok" or "error",
        ts_us = query[1],
      }
    end
  end
end

function finish()
  local unanswered = 0
  for _, by_client in pairs(pending) do
    for _ in pairs(by_client) do unanswered = unanswered + 1 end
  end
  tcpkit.log("dns.lua: " .. unanswered .. " queries unanswered")
end
