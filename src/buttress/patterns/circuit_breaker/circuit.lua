local circuit, trials, reporters = KEYS[1], KEYS[2], KEYS[3]
local op = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- A key this script cannot read (another type, an unknown state, a count that is not one) is
-- corrupt: someone wrote it by hand, or a version of buttress that knows more. It is started over
-- (closed, clean, a new generation) and the reply says 'corrupt': that call decides locally.
local corrupt = false
local h = redis.pcall('HMGET', circuit, 'state', 'gen', 'seq', 'base', 'succ', 'since', 'streak',
  'hold', 'override', 'until')
if h.err then
  if not string.find(h.err, 'WRONGTYPE', 1, true) then
    return redis.error_reply(h.err)  -- any other error fails the script as it would have
  end
  redis.call('DEL', circuit)
  h, corrupt = {}, true
end
local function count(i)
  local v = h[i]
  if not v then
    return 0
  end
  local n = tonumber(v)
  if n and n >= 0 and n <= 9007199254740991 and n == math.floor(n) then
    return n
  end
  corrupt = true
  return 0
end
local state = h[1] or 'closed'
if state ~= 'closed' and state ~= 'open' and state ~= 'half_open' then
  corrupt = true
end
local gen, seq, base, succ, since = count(2), count(3), count(4), count(5), count(6)
-- Trips since the circuit last closed, and the least ms this open state lasts (Retry-After).
local streak, hold = count(7), count(8)
-- A fleet-wide manual override (forced_open, forced_closed, disabled) and when it ends (ms).
local override, override_until = h[9] or '', count(10)
if override ~= '' and override ~= 'forced_open' and override ~= 'forced_closed'
    and override ~= 'disabled' then
  corrupt = true
end
local ttl = tonumber(ARGV[2])
local dirty = false
local admitted, trial, change = 0, 0, ''

-- A command on the trial leases; a trials key of another type is corrupt too: deleted, then
-- the command runs on no key.
local function on_trials(...)
  local reply = redis.pcall(...)
  if type(reply) == 'table' and reply.err then
    if string.find(reply.err, 'WRONGTYPE', 1, true) then
      redis.call('DEL', trials)
      corrupt = true
    end
    reply = redis.call(...)  -- on no key; any other error fails the script as it would have
  end
  return reply
end

-- ARGV 15-17: open_backoff, max_timeout (ms; '' none), the hold of a circuit this request opens.
-- The open time, as _machine.py's open_time: reset_timeout * open_backoff ^ (streak - 1), capped,
-- or the hold if longer.
local function open_time()
  local ms = tonumber(ARGV[3])
  local backoff = tonumber(ARGV[15]) or 1
  if streak > 1 and backoff ~= 1 then
    ms = math.min(ms * backoff ^ math.min(streak - 1, 64), tonumber(ARGV[16]) or math.huge)
  end
  return math.max(ms, hold)
end

local function move(to, why)
  state = to
  if to == 'open' then
    streak = streak + 1
    hold = tonumber(ARGV[17]) or 0
  else
    if to == 'closed' then
      streak = 0
    end
    hold = 0
  end
  -- generations follow Redis time, so a Redis restarted empty never reuses one
  gen = math.max(gen + 1, now)
  -- failures are kept until the circuit closes (while open and half-open, as pybreaker does)
  if to == 'closed' then
    seq = 0
  else
    seq = seq - base
  end
  base, succ, since = 0, 0, now
  redis.call('DEL', trials)
  dirty = true
  change = why
end

if corrupt then
  override, override_until = '', 0
end
-- An override whose time is up has ended: the circuit goes on from the state beneath it.
if override ~= '' and override_until <= now then
  override, override_until = '', 0
  dirty = true
end

local function clear_before(upto)
  local cleared = math.min(upto, seq)
  if cleared > base then
    base = cleared
    dirty = true
  end
end

if corrupt then
  move('closed', 'corrupt')
end

-- Leases Redis granted (or may have) to requests that timed out: nobody runs those trials.
for lease in string.gmatch(ARGV[14], '%S+') do
  on_trials('ZREM', trials, lease)
end

if ARGV[8] ~= '' and state == 'closed' and tonumber(ARGV[8]) == gen then
  clear_before(tonumber(ARGV[9]))
end

if op == 'admit' and override ~= '' then
  -- forced closed and disabled admit every call as closed-state calls; forced open none
  if override ~= 'forced_open' then
    admitted = 1
  end
elseif op == 'admit' then
  if state == 'open' and now >= since + open_time() then
    move('half_open', 'timeout_elapsed')
  end
  if state == 'closed' then
    admitted = 1
  elseif state == 'half_open' then
    on_trials('ZREMRANGEBYSCORE', trials, '-inf', now)
    if redis.call('ZCARD', trials) < tonumber(ARGV[4]) then
      redis.call('ZADD', trials, now + tonumber(ARGV[5]), ARGV[10])
      redis.call('PEXPIRE', trials, ttl)
      admitted, trial = 1, 1
    end
  end
elseif op == 'record' then
  if ARGV[10] ~= '' then
    on_trials('ZREM', trials, ARGV[10])
  end
  if ARGV[11] ~= '' and tonumber(ARGV[11]) ~= gen then
    change = 'stale'
  elseif ARGV[12] == 'failure' then
    if state == 'closed' then
      seq = seq + 1
      dirty = true
      if ARGV[6] ~= '' and override == '' and seq - base >= tonumber(ARGV[6]) then
        move('open', 'fail_max')
      end
    elseif state == 'half_open' then
      seq = seq + 1
      move('open', 'trial_failed')
    end
  elseif ARGV[12] == 'success' then
    if state == 'half_open' then
      succ = succ + 1
      dirty = true
      if ARGV[7] ~= '' and succ >= tonumber(ARGV[7]) then
        move('closed', 'success_threshold')
      end
    elseif state == 'closed' and ARGV[13] ~= '' then
      clear_before(tonumber(ARGV[13]))
    end
  end
elseif op == 'set' then
  if ARGV[11] ~= '' and tonumber(ARGV[11]) ~= gen then
    change = 'stale'
  elseif ARGV[13] == 'force' or ARGV[12] ~= state then
    move(ARGV[12], 'manual')
  end
elseif op == 'override' then
  -- ARGV[12]: forced_open, forced_closed, disabled, or '' (end it); ARGV[13]: its ms to live.
  -- Forced open opens the circuit beneath (once it ends, a trial probes before closing); the
  -- others close it.
  if ARGV[12] == 'forced_open' then
    move('open', 'manual')
  else
    move('closed', 'manual')
  end
  override = ARGV[12]
  override_until = override ~= '' and now + tonumber(ARGV[13]) or 0
elseif op == 'vote' then
  -- A process whose own rate window tripped (ARGV[10]: its id; ARGV[11]: the generation its
  -- window counted in; ARGV[12]: ms a vote stands, the span of a time window or the open time
  -- of a count window's trip; ARGV[13]: min_reporters). The fleet opens once that many
  -- distinct processes voted within that time.
  if ARGV[11] ~= '' and tonumber(ARGV[11]) ~= gen then
    change = 'stale'
  elseif state == 'closed' and override == '' then
    local window = tonumber(ARGV[12])
    redis.call('ZADD', reporters, now, ARGV[10])
    redis.call('ZREMRANGEBYSCORE', reporters, '-inf', now - window)
    redis.call('PEXPIRE', reporters, window)
    if redis.call('ZCARD', reporters) >= tonumber(ARGV[13]) then
      redis.call('DEL', reporters)
      move('open', 'quorum')
    end
  end
end

if corrupt then
  change = 'corrupt'
end
if dirty then
  redis.call('HSET', circuit, 'state', state, 'gen', gen, 'seq', seq, 'base', base,
    'succ', succ, 'since', since, 'streak', streak, 'hold', hold, 'override', override,
    'until', override_until)
  -- an override outlives the keys' idle TTL if it is longer
  redis.call('PEXPIRE', circuit, math.max(ttl, override_until - now))
end
-- one bulk string: parsing an 11-element array costs the client more than the round trip
-- (then: the open time in ms while open, for retry_after; the override, '-' for none, and its
-- ms left)
local function reply(admitted_now, trial_now, lease)
  return string.format('%s %d %d %d %d %d %d %d %d %s %s %d %s %d', state, gen, seq, base, succ,
    since, now, admitted_now, trial_now, change, lease,
    state == 'open' and math.ceil(open_time()) or 0, override ~= '' and override or '-',
    override ~= '' and override_until - now or 0)
end
-- A transition is told to every process at once (their near-caches): the new state, as a
-- reply that admits nothing, on the circuit's channel.
if change ~= '' and change ~= 'stale' then
  redis.call('PUBLISH', circuit .. ':changes', reply(0, 0, ''))
end
return reply(admitted, trial, trial == 1 and ARGV[10] or '')
