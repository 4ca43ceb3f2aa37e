-- wrk: POST /orders, one line of one unit of a random product, as a random buyer.
-- Reads "user token" lines from $TOKENS and product ids from $PRODUCTS (one per line).
local tokens, products = {}, {}
threads = {}

function setup(thread)
  table.insert(threads, thread)
end

local function lines(path)
  local found = {}
  for line in io.lines(path) do found[#found + 1] = line end
  return found
end

function init(args)
  for _, line in ipairs(lines(os.getenv("TOKENS"))) do
    local _, token = line:match("(%d+) (%S+)")
    tokens[#tokens + 1] = token
  end
  products = lines(os.getenv("PRODUCTS"))
  math.randomseed(os.time() + (tonumber(tostring({}):match("0x(%x+)"), 16) or 0) % 100000)
end

function request()
  local token = tokens[math.random(#tokens)]
  local product = products[math.random(#products)]
  local body = '{"items":[{"productId":' .. product .. ',"quantity":1}]}'
  return wrk.format("POST", "/orders",
    { ["Authorization"] = "Bearer " .. token, ["Content-Type"] = "application/json" }, body)
end

-- Answers by status, summed over the threads at the end.
statuses = {}

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads) do
    for status, count in pairs(thread:get("statuses")) do
      total[status] = (total[status] or 0) + count
    end
  end
  local parts = {}
  for status, count in pairs(total) do parts[#parts + 1] = status .. "×" .. count end
  table.sort(parts)
  io.write("statuses: " .. table.concat(parts, " ") .. "\n")
end
