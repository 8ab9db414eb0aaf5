-- example.lua: prints every packet that carries a payload, as the C tool's raw mode does:
--   2018-11-22 10:00:00 127.0.0.1:53499=>127.0.0.1:6379 REQ 31 *3\r\n$3\r\nset\r\n...
-- Usage: tcpkit -p 6379 -m raw -S scripts/example.lua

local function escape(payload)
  return (payload:gsub("[^%w%p ]", function(c) return string.format("\\x%02x", c:byte()) end))
end

function process(packet)
  if packet.size == 0 then
    return
  end
  print(string.format("%s %s:%d=>%s:%d %s %d %s",
    os.date("%Y-%m-%d %H:%M:%S", packet.tv_sec),
    packet.sip, packet.sport, packet.dip, packet.dport,
    packet.request and "REQ" or "RSP", packet.size, escape(packet.payload)))
end
