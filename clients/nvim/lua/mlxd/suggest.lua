-- mlxd.suggest: inline completion as virtual text while typing in insert mode.
--
-- Each change in insert mode hides the suggestion on screen and (re)starts a debounce
-- timer; when it fires, a `generate` goes out for the text around the cursor, naming the
-- previous keystroke's request in `supersedes`, so the daemon cancels it first. Chunks of
-- any request but the current one are ignored. The suggestion is drawn with extmarks at the
-- cursor and inserted by `accept()`.
--
-- Threading: Neovim's main loop only (autocmds, timers and client callbacks all run there).

local uv = vim.uv or vim.loop

local M = {}

local ns = vim.api.nvim_create_namespace("mlxd_suggest")
M.ns = ns
local has_inline = vim.fn.has("nvim-0.10") == 1

-- One suggestion at a time, editor-wide: only one cursor types.
local S = {
  client = nil,
  config = nil,
  timer = nil,
  current = nil, -- the request whose chunks are shown: {id, buf, tick, row, col, text, typed_at}
  inflight = nil, -- the id of the last generate sent, until its done: what `supersedes` names
  typed_at = nil, -- when the latest keystroke happened (uv.hrtime), for the latency stat
}

M.stats = {
  keystrokes = 0,
  requests = 0,
  completed = 0, -- ended "stop" or "length"
  cancelled = 0, -- ended "cancelled" (superseded, or cancelled by leaving insert mode)
  failed = 0,
  latencies_ms = {}, -- per request shown: keystroke to first virtual-text character
}

local function emit(pattern)
  if vim.fn.exists("#User#" .. pattern) == 1 then
    vim.api.nvim_exec_autocmds("User", { pattern = pattern, modeline = false })
  end
end

function M.clear()
  for _, buf in ipairs(vim.api.nvim_list_bufs()) do
    if vim.api.nvim_buf_is_loaded(buf) then
      vim.api.nvim_buf_clear_namespace(buf, ns, 0, -1)
    end
  end
end

local function cursor_ctx()
  local buf = vim.api.nvim_get_current_buf()
  local pos = vim.api.nvim_win_get_cursor(0)
  return { buf = buf, tick = vim.api.nvim_buf_get_changedtick(buf), row = pos[1] - 1, col = pos[2] }
end

--- True while the cursor and the text are where the request `ctx` was made.
local function still_valid(ctx)
  if not ctx or vim.api.nvim_get_current_buf() ~= ctx.buf then
    return false
  end
  local now = cursor_ctx()
  return now.tick == ctx.tick and now.row == ctx.row and now.col == ctx.col
end

local function render(ctx)
  vim.api.nvim_buf_clear_namespace(ctx.buf, ns, 0, -1)
  if ctx.text == "" then
    return
  end
  local hl = S.config.hl_group
  local lines = vim.split(ctx.text, "\n", { plain = true })
  local opts = { virt_text = { { lines[1], hl } }, hl_mode = "combine" }
  local line = vim.api.nvim_buf_get_lines(ctx.buf, ctx.row, ctx.row + 1, false)[1] or ""
  if has_inline then
    opts.virt_text_pos = "inline"
  elseif ctx.col >= #line then
    opts.virt_text_pos = "overlay" -- at the end of the line it covers nothing
  else
    opts.virt_text_pos = "eol" -- mid-line, before 0.10: shown after the line
  end
  if #lines > 1 then
    local extra = {}
    for i = 2, #lines do
      table.insert(extra, { { lines[i], hl } })
    end
    opts.virt_lines = extra
  end
  vim.api.nvim_buf_set_extmark(ctx.buf, ns, ctx.row, ctx.col, opts)
end

--- The text around the cursor: (prefix, suffix). The prefix starts at a whole line that
--- moves in steps of a quarter of `max_prefix_lines`, not with every new line, so that
--- successive prompts share their start and the daemon's prompt cache serves it.
local function surroundings(ctx)
  local cfg = S.config
  local step = math.max(1, math.floor(cfg.max_prefix_lines / 4))
  local first = math.floor(math.max(0, ctx.row - cfg.max_prefix_lines) / step) * step
  local last = ctx.row + 1 + cfg.max_suffix_lines
  local lines = vim.api.nvim_buf_get_lines(ctx.buf, first, last, false)
  local at = ctx.row - first + 1
  local before = { (table.unpack or unpack)(lines, 1, at - 1) }
  table.insert(before, lines[at]:sub(1, ctx.col))
  local after = { lines[at]:sub(ctx.col + 1) }
  for i = at + 1, #lines do
    table.insert(after, lines[i])
  end
  return table.concat(before, "\n"), table.concat(after, "\n")
end

local function finished(id, message)
  if S.inflight == id then
    S.inflight = nil
  end
  if message.type == "error" then
    M.stats.failed = M.stats.failed + 1
  elseif message.finish_reason == "cancelled" then
    M.stats.cancelled = M.stats.cancelled + 1
  else
    M.stats.completed = M.stats.completed + 1
  end
  if S.current and S.current.id == id then
    S.current.done = message
    emit("MlxdSuggestionDone")
  end
end

--- Ask for a completion at the cursor now (the debounce's end, or :MlxdComplete).
function M.request()
  local cfg = S.config
  local ctx = cursor_ctx()
  local prefix, suffix = surroundings(ctx)
  local message = {
    type = "generate",
    prompt = prefix,
    max_tokens = cfg.max_tokens,
    temperature = cfg.temperature,
    model = cfg.model,
    keep_alive = cfg.keep_alive,
  }
  if cfg.stop and #cfg.stop > 0 then
    message.stop = cfg.stop
  end
  if cfg.fim and suffix ~= "" then
    message.suffix = suffix
  end
  if S.inflight and S.client:in_flight(S.inflight) then
    message.supersedes = S.inflight
  end
  ctx.text = ""
  ctx.typed_at = S.typed_at -- nil for :MlxdComplete with no keystroke before it
  S.typed_at = nil
  S.current = ctx
  M.stats.requests = M.stats.requests + 1
  local id
  id = S.client:request(message, {
    on_message = function(msg)
      if msg.type ~= "chunk" or S.current ~= ctx or msg.text == "" then
        return
      end
      if not still_valid(ctx) then
        M.dismiss()
        return
      end
      local first = ctx.text == ""
      ctx.text = ctx.text .. msg.text
      render(ctx)
      if first and ctx.typed_at then
        local ms = (uv.hrtime() - ctx.typed_at) / 1e6
        table.insert(M.stats.latencies_ms, ms)
      end
      emit("MlxdSuggestion")
    end,
    on_end = function(msg)
      finished(id, msg)
    end,
  })
  ctx.id = id
  if S.client:in_flight(id) then
    S.inflight = id
  end
end

--- Hide the suggestion and forget it; the request (if running) is cancelled.
function M.dismiss()
  if S.timer then
    S.timer:stop()
  end
  S.current = nil
  if S.inflight then
    S.client:cancel(S.inflight)
  end
  M.clear()
end

--- The suggestion shown now, or nil: {text, id, done}.
function M.current()
  local ctx = S.current
  if not ctx or ctx.text == "" or not still_valid(ctx) then
    return nil
  end
  return { text = ctx.text, id = ctx.id, done = ctx.done }
end

--- Insert the suggestion at the cursor; false when there is none.
function M.accept()
  local ctx = S.current
  if not ctx or ctx.text == "" or not still_valid(ctx) then
    return false
  end
  local lines = vim.split(ctx.text, "\n", { plain = true })
  M.dismiss()
  vim.api.nvim_buf_set_text(ctx.buf, ctx.row, ctx.col, ctx.row, ctx.col, lines)
  local row = ctx.row + #lines
  local col = (#lines == 1 and ctx.col or 0) + #lines[#lines]
  vim.api.nvim_win_set_cursor(0, { row, col })
  return true
end

local function on_text_changed()
  S.typed_at = uv.hrtime()
  M.stats.keystrokes = M.stats.keystrokes + 1
  S.current = nil -- whatever is in flight is stale now; `supersedes` cancels it
  M.clear()
  if not S.config.auto or not M.enabled_here() then
    return
  end
  S.timer:stop()
  S.timer:start(S.config.debounce_ms, 0, vim.schedule_wrap(function()
    if vim.fn.mode():sub(1, 1) == "i" then
      M.request()
    end
  end))
end

function M.enabled_here()
  local ft = vim.bo.filetype
  local fts = S.config.filetypes
  if fts[ft] ~= nil then
    return fts[ft]
  end
  return vim.bo.buftype == "" and fts["*"] ~= false
end

function M.setup(client, config)
  S.client = client
  S.config = config
  S.timer = S.timer or uv.new_timer()
  vim.api.nvim_set_hl(0, "MlxdSuggestion", { link = "Comment", default = true })
  local group = vim.api.nvim_create_augroup("mlxd_suggest", { clear = true })
  vim.api.nvim_create_autocmd({ "TextChangedI", "TextChangedP" }, {
    group = group,
    callback = on_text_changed,
  })
  vim.api.nvim_create_autocmd({ "CursorMovedI", "CursorMoved" }, {
    group = group,
    callback = function()
      if S.current and not still_valid(S.current) then
        S.current = nil
        M.clear()
      end
    end,
  })
  vim.api.nvim_create_autocmd({ "InsertLeave", "BufLeave" }, {
    group = group,
    callback = M.dismiss,
  })
  if config.accept_key and config.accept_key ~= "" then
    local key = vim.api.nvim_replace_termcodes(config.accept_key, true, false, true)
    vim.keymap.set("i", config.accept_key, function()
      if not M.accept() then
        vim.api.nvim_feedkeys(key, "n", false)
      end
    end, { desc = "mlxd: accept the suggestion" })
  end
  if config.dismiss_key and config.dismiss_key ~= "" then
    vim.keymap.set("i", config.dismiss_key, M.dismiss, { desc = "mlxd: dismiss the suggestion" })
  end
end

return M
