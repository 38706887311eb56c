-- wrk script: hashtag-detail requests over many keys, for bench/run.sh.
--
--   wrk ... -s bench/keys.lua URL -- zipf   PREFIX N   Zipf(s=1) over PREFIX0..PREFIX<N-1>
--   wrk ... -s bench/keys.lua URL -- seq    PREFIX N   each key once, then the thread stops
--   wrk ... -s bench/keys.lua URL -- unique PREFIX     a new key on every request (all misses)
--
-- Keys are hashtag names, so they must stay letters, digits and `_`. Every
-- wrk thread gets its own id (set in setup), so with several threads `seq`
-- stripes the keys and `unique` never repeats a key across threads.
-- Requests are pre-built where possible: wrk runs on one CPU and must not be
-- the bottleneck.

-- report.lua lives next to this file.
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "report.lua")

local PATH = "/v1/tiktok/trending/hashtag/detail?hashtag_name="
local next_id = 0

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
end

local mode, prefix, n
local requests, cdf
local counter, step, verifying = 0, 1, false

local function build(i)
  return wrk.format("GET", PATH .. prefix .. i)
end

function init(args)
  mode, prefix, n = args[1], args[2] or "k", tonumber(args[3] or "0")
  id = id or 0
  math.randomseed(1234 + id)
  if mode == "zipf" then
    requests, cdf = {}, {}
    local total = 0
    for i = 1, n do
      total = total + 1 / i
      cdf[i] = total
      requests[i] = build(i - 1)
    end
    for i = 1, n do cdf[i] = cdf[i] / total end
  elseif mode == "seq" then
    counter = id
    step = tonumber(args[4] or "1")
    verifying = id == 0
  elseif mode ~= "unique" then
    error("mode must be zipf, seq or unique, got " .. tostring(mode))
  end
  prefix = prefix .. (mode == "unique" and (id .. "_") or "")
end

local function zipf_index()
  local u = math.random()
  local lo, hi = 1, n
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if cdf[mid] < u then lo = mid + 1 else hi = mid end
  end
  return lo
end

function request()
  if mode == "zipf" then
    return requests[zipf_index()]
  elseif mode == "seq" then
    if verifying then
      -- wrk calls request() once in thread 0 before the run to check the
      -- request; that one is never sent, so it must not use up a key.
      verifying = false
      return build(counter)
    end
    local i = counter
    if i >= n then
      wrk.thread:stop()
      i = n - 1
    end
    counter = counter + step
    return build(i)
  else
    counter = counter + 1
    return build(counter)
  end
end
