-- top-keys.lua: the most requested keys and the biggest replies per key, from the paired
-- requests of a protocol mode (on_exchange); printed at the end.
-- Usage: tcpkit -p 6379 -m redis -S scripts/top-keys.lua [-t 100000 to quiet the slow log]

local counts, biggest = {}, {}
local TOP = 10

function on_exchange(e)
  -- The key is the first argument: "GET user:42" -> "user:42".
  local key = e.summary:match("^%S+%s+(%S+)")
  if not key then return end
  counts[key] = (counts[key] or 0) + 1
  if (biggest[key] or 0) < e.rsp_bytes then biggest[key] = e.rsp_bytes end
end

local function top(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b) if t[a] ~= t[b] then return t[a] > t[b] end return a < b end)
  return keys
end

function finish()
  print("top keys by requests:")
  for i, k in ipairs(top(counts)) do
    if i > TOP then break end
    print(string.format("  %8d  %s", counts[k], k))
  end
  print("top keys by reply size (bytes):")
  for i, k in ipairs(top(biggest)) do
    if i > TOP then break end
    print(string.format("  %8d  %s", biggest[k], k))
  end
end
