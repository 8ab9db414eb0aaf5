-- tcp-connect.lua: TCP connection set-up time (SYN to SYN/ACK, as seen from the capture point)
-- and SYN retransmissions, per connection; a summary at the end.
-- Usage: tcpkit -p 6379 -m raw -S scripts/tcp-connect.lua

local SYN, ACK = 2, 16
local syns = {}        -- "client=>server" -> { first = µs, count = n }
local connects, retransmits, total_us, max_us = 0, 0, 0, 0

function process(p)
  if p.flags == nil then return end
  local syn = bit32.band(p.flags, SYN) ~= 0
  local ack = bit32.band(p.flags, ACK) ~= 0
  local now = p.tv_sec * 1000000 + p.tv_usec
  if syn and not ack then
    local key = p.sip .. ":" .. p.sport .. "=>" .. p.dip .. ":" .. p.dport
    local s = syns[key]
    if s then
      s.count = s.count + 1
      retransmits = retransmits + 1
    else
      syns[key] = { first = now, count = 1 }
    end
  elseif syn and ack then
    local key = p.dip .. ":" .. p.dport .. "=>" .. p.sip .. ":" .. p.sport
    local s = syns[key]
    if s then
      syns[key] = nil
      local took = now - s.first
      connects = connects + 1
      total_us = total_us + took
      if took > max_us then max_us = took end
      print(string.format("%s connect %.3f ms, %d SYN(s)", key, took / 1000, s.count))
    end
  end
end

function finish()
  local avg = connects > 0 and total_us / connects / 1000 or 0
  print(string.format("connections %d, avg %.3f ms, max %.3f ms, SYN retransmissions %d",
    connects, avg, max_us / 1000, retransmits))
end
