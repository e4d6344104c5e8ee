-- wrk script for scripts/soak (tests/src/bin/envoy-soak.rs runs it): rotates six requests (two good keys, a bad
-- key, no key, a key on a route its client may not use, an expired key),
-- counts every status and every keyswap answer, and stops each thread
-- after its share of requests.
--
--   wrk -s scripts/soak.lua URL -- PER_THREAD GOOD_KEY BAD_KEY EXPIRED_KEY DONE_DIR
--
-- wrk itself runs for its whole -d duration even when every thread has
-- stopped, so a thread that is done writes DONE_DIR/done-N, and scripts/soak
-- ends wrk with SIGINT (wrk then reports as usual) once all have.
-- done() prints one line: `SOAK-RESULT {json}`.

local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("offset", #threads)
end

function init(args)
  quota = tonumber(args[1])
  local good, bad, expired = args[2], args[3], args[4]
  done_file = args[5] .. "/done-" .. tostring(offset)
  -- The gateway (tests/src/envoy.rs) selects Envoy's route by the
  -- x-test-route header: chat or admin, each to the cluster of its name.
  local function with(route, extra)
    local h = { ["Host"] = "soak.local", ["x-test-route"] = route }
    for k, v in pairs(extra) do h[k] = v end
    return h
  end
  requests = {
    wrk.format("GET", "/v1/chat/completions", with("chat", { ["Authorization"] = "Bearer " .. good })),
    wrk.format("GET", "/v1/chat/completions?api_key=" .. good .. "&n=1", with("chat", {})),
    wrk.format("GET", "/v1/chat/completions", with("chat", { ["Authorization"] = "Bearer " .. bad })),
    wrk.format("GET", "/v1/chat/completions", with("chat", {})),
    wrk.format("GET", "/v1/admin/users", with("admin", { ["x-api-key"] = good })),
    wrk.format("GET", "/v1/chat/completions", with("chat", { ["x-api-key"] = expired })),
  }
  statuses, answers, answered, n = {}, {}, 0, offset or 0
end

function request()
  n = n + 1
  return requests[(n % #requests) + 1]
end

function response(status, headers, body)
  answered = answered + 1
  local s = tostring(status)
  statuses[s] = (statuses[s] or 0) + 1
  local answer
  if status == 200 then
    -- the echo upstream's JSON: the request it received
    answer = string.find(body, '"path":', 1, true) and "forwarded" or "200 without the echo"
  else
    answer = string.match(body, '"error":"([a-z_]+)"') or ("other " .. s)
  end
  answers[answer] = (answers[answer] or 0) + 1
  if answered == quota then
    local f = io.open(done_file, "w")
    if f then f:close() end
    wrk.thread:stop()
  end
end

local function json(map)
  local parts = {}
  for k, v in pairs(map) do
    table.insert(parts, string.format("%q:%d", k, v))
  end
  return "{" .. table.concat(parts, ",") .. "}"
end

function done(summary, latency, _)
  local statuses_all, answers_all = {}, {}
  for _, thread in ipairs(threads) do
    for k, v in pairs(thread:get("statuses")) do statuses_all[k] = (statuses_all[k] or 0) + v end
    for k, v in pairs(thread:get("answers")) do answers_all[k] = (answers_all[k] or 0) + v end
  end
  local e = summary.errors
  io.write(string.format(
    'SOAK-RESULT {"statuses":%s,"answers":%s,"requests":%d,"duration_us":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d},' ..
    '"latency_us":{"mean":%.1f,"p50":%d,"p99":%d,"max":%d}}\n',
    json(statuses_all), json(answers_all), summary.requests, summary.duration,
    e.connect, e.read, e.write, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(99), latency.max))
end
