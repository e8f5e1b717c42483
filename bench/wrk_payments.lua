-- wrk driver for make bench (bench/wrk.py runs it). Arguments after `--`:
--   api_key lo n hot batch_size seed
-- Accounts are lo .. lo+n-1. hot > 0 fixes the buyer. batch_size > 0 sends POST /payments/batch
-- bodies of that many items (non-atomic), else single POST /payments bodies.
-- wrk's own counters give non-2xx/3xx statuses (errors.status) and socket errors; response()
-- counts the 429s among them.
local threads = {}
local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("thread_id", counter)
  table.insert(threads, thread)
end

local lo, n, hot, batch, think_ms

function init(args)
  wrk.method = "POST"
  wrk.headers["Authorization"] = "Bearer " .. args[1]
  wrk.headers["Content-Type"] = "application/json"
  lo, n, hot, batch = tonumber(args[2]), tonumber(args[3]), tonumber(args[4]), tonumber(args[5])
  think_ms = tonumber(args[7] or "0")  -- a pause before every request (bench.side_by_side)
  math.randomseed(tonumber(args[6]) * 1000 + thread_id)
end

-- The API answers 429 while too many payments are pending (admission control): count those
-- apart from failures, and back off as a client should before the next request (BACKOFF_MS
-- rather than Retry-After's whole second, to keep the workers fed). A refused request is sent
-- again, the same body, as a client does (its payments are still to be made): each request
-- carries an X-Request-ID, which the API echoes, so the answer names the body it refused
-- (one wrk thread serves many connections, and response() is not told which).
throttled = 0
local backoffs = 0
local BACKOFF_MS = 100
local sent = 0
local in_flight = {}  -- request id -> body
local refused = {}    -- bodies to send again, oldest first

function response(status, headers, body)
  local id = headers["X-Request-ID"]
  local sent_body = id and in_flight[id]
  if id then in_flight[id] = nil end
  if status == 429 then
    throttled = throttled + 1
    backoffs = backoffs + 1
    if sent_body then table.insert(refused, sent_body) end
  end
end

function delay()
  if backoffs > 0 then
    backoffs = backoffs - 1
    return BACKOFF_MS
  end
  return think_ms
end

local function item(use_hot)
  local buyer = lo + math.random(0, n - 1)
  if use_hot and hot > 0 then buyer = hot end
  local seller = lo + ((buyer - lo + math.random(1, n - 1)) % n)
  return string.format('{"buyer_account_id":%d,"seller_account_id":%d,"amount":"0.%02d"}',
                       buyer, seller, math.random(1, 99))
end

local function new_body()
  if batch > 0 then
    local items = {}
    for i = 1, batch do items[i] = item(false) end
    return '{"atomic":false,"payments":[' .. table.concat(items, ",") .. ']}'
  end
  return item(true)
end

function request()
  local body = table.remove(refused, 1) or new_body()
  sent = sent + 1
  local id = "wrk-" .. thread_id .. "-" .. sent
  in_flight[id] = body
  local headers = {["X-Request-ID"] = id}  -- wrk.format takes these instead of wrk.headers
  for name, value in pairs(wrk.headers) do headers[name] = value end
  return wrk.format(nil, nil, headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  local throttled_total = 0
  for _, t in ipairs(threads) do throttled_total = throttled_total + (t:get("throttled") or 0) end
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"status_errors":%d,"timeout_errors":%d,' ..
    '"throttled":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    throttled_total,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean))
end
