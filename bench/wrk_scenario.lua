-- wrk script for bench_api.py: one scenario per run, chosen by environment variables.
--
--   BENCH_MODE      health | read | event   (same names and bodies as loadgen.py: keep them in step)
--   BENCH_ENTITIES  entities u0..u<N-1>     (default 1000)
--   BENCH_RUN_ID    prefix of event ids     (unique per run and phase, so no event is a duplicate)
--   BENCH_SEED      random seed             (default 1)
--   BENCH_OUT       file the JSON summary is written to by done()
--
-- Bodies are built per request in request(): event ids must be unique, and a fixed wrk.body cannot be.

local mode = os.getenv("BENCH_MODE") or "health"
local entities = tonumber(os.getenv("BENCH_ENTITIES") or "1000")
local run_id = os.getenv("BENCH_RUN_ID") or "wrk"
local seed = tonumber(os.getenv("BENCH_SEED") or "1")
local out_path = os.getenv("BENCH_OUT")
local devices_per_entity = 4

local threads = {}
local counter = 0
local headers = { ["Content-Type"] = "application/json" }
local health_request = nil

-- Runs in the main Lua state once per thread: give each thread an id (a global in its own state).
function setup(thread)
  thread:set("thread_id", #threads)
  table.insert(threads, thread)
end

function init(args)
  math.randomseed(seed + (thread_id or 0) * 7919)
  health_request = wrk.format("GET", "/health")
end

function request()
  if mode == "health" then
    return health_request
  end
  local k = math.random(0, entities - 1)
  if mode == "read" then
    return wrk.format("POST", "/decide", headers, string.format('{"entity_id":"u%d"}', k))
  end
  counter = counter + 1
  local device = k * devices_per_entity + math.random(0, devices_per_entity - 1)
  local amount = 1.0 + math.random() * 499.0
  local body = string.format(
    '{"entity_id":"u%d","event":{"event_id":"%s-%d-%d","amount":%.2f,"event_type":"payment",'
      .. '"attributes":{"device_id":"d%d"}}}',
    k, run_id, thread_id or 0, counter, amount, device)
  return wrk.format("POST", "/decide", headers, body)
end

-- Runs once in the main state after the test: write the summary and the latency distribution as JSON.
function done(summary, latency, requests)
  local percentiles = { 50, 75, 90, 99, 99.9, 99.99 }
  local parts = {}
  for _, q in ipairs(percentiles) do
    table.insert(parts, string.format('"p%s":%.3f', tostring(q), latency:percentile(q) / 1000.0))
  end
  local e = summary.errors
  local json = string.format(
    '{"requests":%d,"duration_us":%d,"bytes":%d,'
      .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
      .. '"latency_ms":{%s,"min":%.3f,"max":%.3f,"mean":%.3f,"stdev":%.3f}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    table.concat(parts, ","), latency.min / 1000.0, latency.max / 1000.0,
    latency.mean / 1000.0, latency.stdev / 1000.0)
  if out_path then
    local f = assert(io.open(out_path, "w"))
    f:write(json)
    f:close()
  else
    io.write(json)
  end
end
