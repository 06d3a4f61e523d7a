-- wrk script: POST one realistic transition per request, each with a new event id.
-- Usage: WRK_OUT=out.json wrk -s bench/wrk/transition.lua <url> -- <api key> <run tag>
-- done() writes the request count and latency percentiles as JSON to $WRK_OUT (done()
-- runs in wrk's main Lua state, which never sees the script arguments).
local counter = 0
local threads = {}
local key, tag

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  key, tag = args[1], args[2]
  wrk.method = "POST"
  wrk.path = "/v1/transitions"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer " .. key
end

local body = '{"event_id":"w_%s_%d_%d","merchant_id":"acme","shipment_id":"shp_w_%d",'
  .. '"tracking_number":"1Z999AA10123456784","carrier":"ups","status":"in_transit",'
  .. '"occurred_at":"2026-11-20T09:30:00+01:00",'
  .. '"location":{"city":"Leipzig","region":"SN","country":"DE","lat":51.34,"lon":12.37},'
  .. '"estimated_delivery":{"start":"2026-11-24T10:00:00+01:00","end":"2026-11-24T14:00:00+01:00"},'
  .. '"carrier_status_code":"X7","carrier_description":"Departed facility",'
  .. '"tracking_url":"https://track.example.com/1Z999AA10123456784",'
  .. '"recipient":{"name":"Ana","email":"ana@example.com","phone":"+33612345678",'
  .. '"locale":"fr_FR","timezone":"Europe/Paris"},"order":{"number":"1001"}}'

function request()
  counter = counter + 1
  return wrk.format(nil, nil, nil, string.format(body, tag, id, counter, counter % 5000))
end

function done(summary, latency, requests)
  local f = io.open(os.getenv("WRK_OUT"), "w")
  f:write(string.format(
    '{"requests": %d, "duration_s": %f, "errors": %d, "non2xx": %d,'
      .. ' "p50_ms": %f, "p90_ms": %f, "p99_ms": %f, "max_ms": %f}',
    summary.requests, summary.duration / 1e6,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000))
  f:close()
end
