-- mlxd.client: one connection to the daemon, many requests in flight, replies routed by id.
--
-- The wire protocol is docs/PROTOCOL.md: frames of a 4-byte big-endian length and one
-- MessagePack map, `hello` first, then requests carrying client-chosen ids. Built on
-- Neovim's own `vim.mpack` and libuv pipes (`vim.uv`, `vim.loop` before 0.10): no
-- dependencies.
--
-- Threading: everything runs on Neovim's main loop. libuv callbacks are wrapped in
-- `vim.schedule_wrap`, so handlers may call any Neovim API.

local uv = vim.uv or vim.loop

local M = {}

M.PROTOCOL_VERSION = 1

--- The daemon's default socket: $MLXD_SOCKET, else the platform's place (protocol/paths.py).
function M.default_socket()
  local env = os.getenv("MLXD_SOCKET")
  if env and env ~= "" then
    return env
  end
  local home = os.getenv("HOME") or ""
  if uv.os_uname().sysname == "Darwin" then
    return home .. "/Library/Application Support/mlxd/mlxd.sock"
  end
  local runtime = os.getenv("XDG_RUNTIME_DIR")
  if runtime and runtime ~= "" then
    return runtime .. "/mlxd/mlxd.sock"
  end
  return "/tmp/mlxd-" .. tostring(uv.getuid()) .. "/mlxd.sock"
end

local function u32be(n)
  return string.char(
    math.floor(n / 16777216) % 256,
    math.floor(n / 65536) % 256,
    math.floor(n / 256) % 256,
    n % 256
  )
end

--- One MessagePack frame for `message` (a Lua table with string keys).
function M.frame(message)
  local payload = vim.mpack.encode(message)
  return u32be(#payload) .. payload
end

local Client = {}
Client.__index = Client

--- A client for the socket at `opts.path`; nothing connects until the first request.
--- opts: path, name (for the daemon's logs), reconnect_ms (the least time between two
--- attempts to connect), on_state(state, detail) called on "ready" and "down".
function M.new(opts)
  return setmetatable({
    path = opts.path or M.default_socket(),
    name = opts.name or "mlxd.nvim",
    reconnect_ms = opts.reconnect_ms or 1000,
    hello_timeout_ms = opts.hello_timeout_ms or 5000,
    on_state = opts.on_state or function() end,
    state = "down", -- "down" | "connecting" | "ready"
    welcome = nil,
    next_id = 1,
    pending = {}, -- id -> handlers, for every request not yet ended
    outbox = {}, -- frames written once the handshake is done
    inbuf = "",
    pipe = nil,
    last_attempt = nil,
    last_error = nil,
    down_code = nil, -- why the last connection ended, for requests made while down
  }, Client)
end

function Client:_set_state(state, detail)
  if self.state == state then
    return
  end
  self.state = state
  self.last_error = state == "down" and detail or nil
  self.on_state(state, detail)
end

--- Connect now unless connected, connecting, or an attempt failed less than
--- `reconnect_ms` ago (so a missing daemon costs one failed connect per interval).
function Client:connect()
  if self.state ~= "down" then
    return true
  end
  local now = uv.now()
  if self.last_attempt and now - self.last_attempt < self.reconnect_ms then
    return false
  end
  self.last_attempt = now
  self.state = "connecting"
  self.inbuf = ""
  -- Whoever owns the socket runs the server behind it: a socket another user made (in a
  -- folder they could write to) would get our buffers. Checked before connecting.
  local st = uv.fs_stat(self.path)
  if st and st.uid ~= uv.getuid() then
    self:_close(
      self.path .. " belongs to uid " .. st.uid .. ", not to you (uid " .. uv.getuid()
        .. "): it is not your mlxd, so nothing was sent to it",
      false,
      "permission_denied"
    )
    return false
  end
  local pipe = uv.new_pipe(false)
  self.pipe = pipe
  pipe:connect(
    self.path,
    vim.schedule_wrap(function(err)
      if self.pipe ~= pipe then
        return -- closed meanwhile
      end
      if err then
        self:_close("no mlxd at " .. self.path .. " (" .. err .. ")")
        return
      end
      pipe:read_start(vim.schedule_wrap(function(rerr, data)
        if self.pipe ~= pipe then
          return
        end
        if rerr or not data then
          self:_close("the daemon closed the connection" .. (rerr and (" (" .. rerr .. ")") or ""))
        else
          self:_receive(data)
        end
      end))
      self:_write(M.frame({ type = "hello", protocol = M.PROTOCOL_VERSION, client = self.name }))
      -- A daemon that accepts but never answers (stuck) must not hold requests forever.
      vim.defer_fn(function()
        if self.pipe == pipe and self.state == "connecting" then
          self:_close("the daemon did not answer hello")
        end
      end, self.hello_timeout_ms)
    end)
  )
  return true
end

function Client:_write(bytes)
  local pipe = self.pipe
  if not pipe then
    return
  end
  pipe:write(bytes, function(err)
    if err then
      vim.schedule(function()
        if self.pipe == pipe then
          self:_close("write failed: " .. err)
        end
      end)
    end
  end)
end

--- Drop the connection; every request in flight ends with an error: `code` if given, else
--- `daemon_unavailable` if the handshake never finished, else `connection_closed`.
function Client:_close(reason, quiet, code)
  code = code or (self.state == "ready" and "connection_closed" or "daemon_unavailable")
  self.down_code = code
  local pipe = self.pipe
  self.pipe = nil
  self.welcome = nil
  self.outbox = {}
  if pipe and not pipe:is_closing() then
    pipe:close()
  end
  local pending = self.pending
  self.pending = {}
  if quiet then
    self.state = "down"
  else
    self:_set_state("down", reason)
  end
  for id, handlers in pairs(pending) do
    if handlers.on_end then
      handlers.on_end({ type = "error", id = id, code = code, message = reason })
    end
  end
end

--- Close the connection without telling on_state (the editor is leaving, say).
function Client:close()
  self:_close("closed by the editor", true)
end

function Client:_receive(data)
  self.inbuf = self.inbuf .. data
  -- Each frame leaves inbuf before it is dispatched: a handler that lets Neovim run its
  -- event queue can bring the next read here re-entrantly, and it must find only what
  -- no one has dispatched yet (else a chunk would be shown twice).
  while #self.inbuf >= 4 do
    local buf = self.inbuf
    local b1, b2, b3, b4 = buf:byte(1, 4)
    local length = ((b1 * 256 + b2) * 256 + b3) * 256 + b4
    if #buf < 4 + length then
      break
    end
    self.inbuf = buf:sub(5 + length)
    local ok, message = pcall(vim.mpack.decode, buf:sub(5, 4 + length))
    if not ok or type(message) ~= "table" then
      self:_close("undecodable frame from the daemon")
      return
    end
    self:_dispatch(message)
    if self.pipe == nil then
      return -- a handler closed the connection
    end
  end
end

function Client:_dispatch(message)
  local kind = message.type
  if self.state == "connecting" then
    if kind == "welcome" then
      self.welcome = message
      self:_set_state("ready")
      local outbox = self.outbox
      self.outbox = {}
      for _, frame in ipairs(outbox) do
        self:_write(frame)
      end
    else
      self:_close("handshake refused: " .. tostring(message.code) .. ": " .. tostring(message.message))
    end
    return
  end
  local id = message.id
  local handlers = id ~= nil and id ~= vim.NIL and self.pending[id] or nil
  if not handlers then
    return -- an error without id, or a reply to a request we stopped caring about
  end
  if kind == "done" or kind == "error" then
    self.pending[id] = nil
    if handlers.on_end then
      handlers.on_end(message)
    end
  elseif handlers.on_message then
    handlers.on_message(message)
  end
end

--- Send `message` (a table with `type`; its `id` is assigned here) and return the id.
--- handlers.on_message(msg) gets its chunks, queued and progress messages (and any type
--- newer than this client), handlers.on_end(msg) its done or error, exactly once. Without
--- a connection it ends at once, with the error `daemon_unavailable` (`permission_denied`
--- if the socket belongs to another user), unless a connection attempt is under way.
function Client:request(message, handlers)
  handlers = handlers or {}
  local id = self.next_id
  self.next_id = id + 1
  message.id = id
  self:connect()
  if self.state == "down" then
    if handlers.on_end then
      handlers.on_end({
        type = "error",
        id = id,
        code = self.down_code == "permission_denied" and self.down_code or "daemon_unavailable",
        message = self.last_error or ("no mlxd at " .. self.path),
      })
    end
    return id
  end
  self.pending[id] = handlers
  local frame = M.frame(message)
  if self.state == "ready" then
    self:_write(frame)
  else
    table.insert(self.outbox, frame)
  end
  return id
end

--- Ask the daemon to cancel request `id` (it ends with finish_reason "cancelled").
function Client:cancel(id)
  if id and self.pending[id] then
    self:request({ type = "cancel", target = id })
  end
end

function Client:in_flight(id)
  return self.pending[id] ~= nil
end

return M
