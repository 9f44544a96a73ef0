-- mlxd for Neovim: inline completions, a chat buffer and a few commands, over the daemon's
-- socket (docs/PROTOCOL.md). `require("mlxd").setup({...})` turns it on; see
-- clients/nvim/README.md for the options.
--
-- Threading: Neovim's main loop only.

local client_mod = require("mlxd.client")
local suggest = require("mlxd.suggest")
local chat = require("mlxd.chat")

local M = {}

M.defaults = {
  socket = nil, -- default: $MLXD_SOCKET, else the platform's path (see docs/PROTOCOL.md)
  model = nil, -- default: the daemon's default model
  auto = true, -- suggest while typing in insert mode
  debounce_ms = 30,
  max_tokens = 64,
  temperature = 0,
  stop = { "\n\n" },
  keep_alive = nil,
  fim = true, -- send the text after the cursor too (fill in the middle)
  max_prefix_lines = 200, -- up to a quarter more: the window's start moves in steps
  max_suffix_lines = 30, -- processed anew on each keystroke (it follows the prefix)
  accept_key = "<Tab>", -- accepts a shown suggestion, else types itself
  dismiss_key = "<C-]>",
  filetypes = { ["*"] = true }, -- e.g. { markdown = false }; buffers with a buftype are skipped
  hl_group = "MlxdSuggestion",
  reconnect_ms = 1000, -- the least time between two attempts to reach a missing daemon
  chat = { system = nil, max_tokens = 512, temperature = 0, model = nil },
}

M.config = nil
M.client = nil

local function notify(text, level)
  vim.notify("mlxd: " .. text, level or vim.log.levels.INFO)
end

-- One message when the daemon goes missing, one when it is back: never one per keystroke.
local warned = false
local function on_state(state, detail)
  if state == "down" then
    if not warned then
      warned = true
      notify((detail or "disconnected") .. "; completions resume when it runs", vim.log.levels.WARN)
    end
  elseif state == "ready" and warned then
    warned = false
    notify("connected to " .. M.client.path)
  end
end

local function echo(lines)
  local chunks = {}
  for i, line in ipairs(lines) do
    table.insert(chunks, { line .. (i < #lines and "\n" or "") })
  end
  vim.api.nvim_echo(chunks, true, {})
end

local function fmt_bytes(n)
  if not n or n == 0 then
    return "-"
  end
  return string.format("%.1f MB", n / 1e6)
end

--- Call `callback(done)` with the done of a request of `kind` (models, stats, health), or
--- tell the user why there is none.
local function ask(kind, callback)
  M.client:request({ type = kind }, {
    on_end = function(msg)
      if msg.type == "error" then
        notify(msg.code .. ": " .. tostring(msg.message), vim.log.levels.WARN)
      else
        callback(msg)
      end
    end,
  })
end

function M.models()
  ask("models", function(done)
    local lines = { "mlxd models:" }
    for _, m in ipairs(done.models or {}) do
      table.insert(
        lines,
        string.format(
          "  %-20s %-9s %9s  %s",
          m.name,
          m.resident and "resident" or "-",
          fmt_bytes(m.bytes),
          m.path
        )
      )
    end
    echo(lines)
  end)
end

local function median(values)
  if #values == 0 then
    return nil
  end
  local sorted = vim.deepcopy(values)
  table.sort(sorted)
  local mid = math.floor(#sorted / 2)
  if #sorted % 2 == 1 then
    return sorted[mid + 1]
  end
  return (sorted[mid] + sorted[mid + 1]) / 2
end
M.median = median

function M.status()
  local c = M.client
  local st = suggest.stats
  local lat = median(st.latencies_ms)
  local lines = {
    string.format("mlxd: %s  %s", c.state, c.path),
    string.format(
      "  completions: %d requested, %d completed, %d cancelled, %d failed; "
        .. "keystroke to first text: median %s over %d",
      st.requests,
      st.completed,
      st.cancelled,
      st.failed,
      lat and string.format("%.1f ms", lat) or "-",
      #st.latencies_ms
    ),
  }
  if c.state ~= "ready" then
    if c.last_error then
      table.insert(lines, "  " .. c.last_error)
    end
    echo(lines)
    return
  end
  local w = c.welcome
  table.insert(
    lines,
    string.format(
      "  server: %s, protocol %d, default model %s",
      w.server,
      w.protocol,
      w.default_model or "-"
    )
  )
  ask("stats", function(done)
    local s = done.stats
    table.insert(
      lines,
      string.format(
        "  daemon: up %.0f s, %d connections, %d in flight, %d completed, %d cancelled, "
          .. "%d models resident",
        s.uptime_s,
        s.connections,
        s.requests_in_flight,
        s.requests_completed,
        s.requests_cancelled,
        s.models_resident
      )
    )
    echo(lines)
  end)
end

function M.setup(opts)
  M.config = vim.tbl_deep_extend("force", vim.deepcopy(M.defaults), opts or {})
  if opts and opts.stop then
    M.config.stop = opts.stop -- a list is replaced, not merged
  end
  if M.client then
    M.client:close()
  end
  M.client = client_mod.new({
    path = M.config.socket,
    name = "mlxd.nvim",
    reconnect_ms = M.config.reconnect_ms,
    on_state = on_state,
  })
  suggest.setup(M.client, M.config)
  chat.setup(M.client, M.config)

  local cmd = vim.api.nvim_create_user_command
  cmd("MlxdComplete", function()
    suggest.request()
  end, { desc = "mlxd: complete at the cursor now" })
  cmd("MlxdAccept", function()
    suggest.accept()
  end, { desc = "mlxd: insert the suggestion" })
  cmd("MlxdChat", function(a)
    chat.open()
    if a.args ~= "" then
      chat.send(a.args)
    end
  end, { nargs = "*", desc = "mlxd: open the chat; with text, send it" })
  cmd("MlxdModels", M.models, { desc = "mlxd: list the daemon's models" })
  cmd("MlxdStatus", M.status, { desc = "mlxd: connection, completion counts, daemon stats" })
  vim.api.nvim_create_autocmd("VimLeavePre", {
    group = vim.api.nvim_create_augroup("mlxd", { clear = true }),
    callback = function()
      M.client:close()
    end,
  })
  return M
end

M.suggest = suggest
M.chat = chat

return M
