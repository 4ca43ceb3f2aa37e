-- wrk: POST /orders/{id}/pay, each pending order once, as its buyer.
-- Reads "order token" lines from $ORDERS; thread k of n takes the lines k, k+n, k+2n, ...
local orders = {}
local counter = 0
local threads = {}

function setup(thread)
  counter = counter + 1
  thread:set("id", counter)
  table.insert(threads, thread)
end

function init(args)
  local n = tonumber(os.getenv("WRK_THREADS") or "1")
  local index = 0
  for line in io.lines(os.getenv("ORDERS")) do
    if index % n == id - 1 then orders[#orders + 1] = line end
    index = index + 1
  end
  next_order = 1
end

function request()
  local line = orders[next_order]
  if line == nil then
    -- Every order of this thread is paid: ask for something cheap and uncounted.
    return wrk.format("GET", "/healthz")
  end
  next_order = next_order + 1
  local order, token = line:match("(%d+) (%S+)")
  return wrk.format("POST", "/orders/" .. order .. "/pay",
    { ["Authorization"] = "Bearer " .. token }, "")
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
