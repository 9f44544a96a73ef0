-- Drives the mlxd Neovim plugin in `nvim --headless` for tests/test_nvim.py.
--
-- $MLXD_NVIM_TEST names a JSON file: {plugin, socket, sync, results, text, interval_ms,
-- max_tokens}. The script types `text` one key at a time into a code buffer (insert mode,
-- real keys through nvim_input), records each keystroke's time to the first character of
-- virtual text, waits for the last completion, accepts it, runs :MlxdChat, :MlxdModels
-- and :MlxdStatus, then hands over to the test (files in `sync`) while the daemon is
-- stopped and started again, and completes once more, in the middle of the buffer.
-- Results go to JSON files under `results`; any failure is written there as `error`.

local uv = vim.uv or vim.loop
local cfg = vim.fn.json_decode(table.concat(vim.fn.readfile(os.getenv("MLXD_NVIM_TEST")), "\n"))

vim.opt.rtp:prepend(cfg.plugin)
local notes = {}
vim.notify = function(msg, level)
  table.insert(notes, { msg = msg, level = level or vim.log.levels.INFO })
end

local mlxd = require("mlxd").setup({
  socket = cfg.socket,
  max_tokens = cfg.max_tokens,
  stop = {},
  reconnect_ms = 200,
  chat = { max_tokens = 48 },
})

-- Every chunk the client dispatched, and the size of every read: when a suggestion does
-- not equal mlx-lm's output, the test shows this trace (was a token delivered twice?).
local TRACE = {}
do
  local c = mlxd.client
  local orig_d, orig_r = c._dispatch, c._receive
  c._dispatch = function(self, m)
    if m.type == "chunk" then
      table.insert(TRACE, { "d", m.id, m.text, m.tokens and m.tokens[1] or -1 })
    end
    return orig_d(self, m)
  end
  c._receive = function(self, data)
    table.insert(TRACE, { "r", #data, #self.inbuf })
    return orig_r(self, data)
  end
end

local function write_json(name, value)
  vim.fn.writefile({ vim.fn.json_encode(value) }, cfg.results .. "/" .. name)
end

local function touch(name)
  vim.fn.writefile({}, cfg.sync .. "/" .. name)
end

-- The script runs as a coroutine; sleep() and wait_for() yield to Neovim's loop.
local co
local function sleep(ms)
  vim.defer_fn(function()
    assert(coroutine.resume(co))
  end, ms)
  coroutine.yield()
end

local function wait_for(what, pred, timeout_ms)
  local deadline = uv.now() + timeout_ms
  while not pred() do
    if uv.now() > deadline then
      error("timed out waiting for " .. what)
    end
    sleep(5)
  end
end

-- The text of the buffer split at the cursor, computed here rather than by the plugin.
local function around_cursor()
  local text = table.concat(vim.api.nvim_buf_get_lines(0, 0, -1, false), "\n")
  local pos = vim.api.nvim_win_get_cursor(0)
  local offset = vim.fn.line2byte(pos[1]) - 1 + pos[2]
  return text:sub(1, offset), text:sub(offset + 1)
end

-- What the extmarks show: the virtual text, its continuation lines joined by newlines.
local function shown()
  local marks = vim.api.nvim_buf_get_extmarks(0, mlxd.suggest.ns, 0, -1, { details = true })
  local parts = {}
  for _, mark in ipairs(marks) do
    local d = mark[4]
    local line = {}
    for _, chunk in ipairs(d.virt_text or {}) do
      table.insert(line, chunk[1])
    end
    table.insert(parts, table.concat(line))
    for _, vl in ipairs(d.virt_lines or {}) do
      local l = {}
      for _, chunk in ipairs(vl) do
        table.insert(l, chunk[1])
      end
      table.insert(parts, table.concat(l))
    end
  end
  return table.concat(parts, "\n"), #marks
end

-- Per keystroke: nvim_input time to the first virtual text of a request sent after it.
local keystroke = nil -- {t0, first_id}
local latencies = {}
vim.api.nvim_create_autocmd("User", {
  pattern = "MlxdSuggestion",
  callback = function()
    local s = mlxd.suggest.current()
    if keystroke and s and s.id >= keystroke.first_id and shown() ~= "" then
      table.insert(latencies, (uv.hrtime() - keystroke.t0) / 1e6)
      keystroke = nil
    end
  end,
})

local function type_key(key)
  keystroke = { t0 = uv.hrtime(), first_id = mlxd.client.next_id }
  vim.api.nvim_input(key)
end

local function finished_suggestion(timeout_ms)
  wait_for("a finished suggestion", function()
    local s = mlxd.suggest.current()
    return s and s.done ~= nil
  end, timeout_ms)
  return mlxd.suggest.current()
end

local function script()
  -- 1. Typing with completions as you type.
  vim.cmd("enew")
  vim.api.nvim_buf_set_lines(0, 0, -1, false, cfg.lines)
  vim.api.nvim_win_set_cursor(0, { #cfg.lines, #cfg.lines[#cfg.lines] })
  vim.api.nvim_input("A")
  wait_for("insert mode", function()
    return vim.fn.mode() == "i"
  end, 2000)
  for i = 1, #cfg.text do
    local started = uv.now()
    type_key(cfg.text:sub(i, i))
    -- The next key comes interval_ms later, but not before this one's text showed (so
    -- each keystroke gets a time), and while its request still streams (so the next
    -- request supersedes it).
    wait_for("virtual text after key " .. i, function()
      return keystroke == nil
    end, 10000)
    local left = cfg.interval_ms - (uv.now() - started)
    if left > 0 and i < #cfg.text then
      sleep(left)
    end
  end
  local s = finished_suggestion(20000)
  local prefix, suffix = around_cursor()
  local text_shown, marks = shown()
  local stats = vim.deepcopy(mlxd.suggest.stats)
  -- Accept with the mapping (<Tab>), as a user would.
  vim.api.nvim_input("<Tab>")
  wait_for("the accepted text", function()
    local p = around_cursor()
    return p == prefix .. s.text
  end, 2000)
  local after_accept = around_cursor()
  vim.api.nvim_input("<Esc>")
  wait_for("normal mode", function()
    return vim.fn.mode() == "n"
  end, 2000)
  local code_win = vim.api.nvim_get_current_win()

  -- 2. Chat, models, status.
  local chat_done = false
  vim.cmd("MlxdChat Say hello to the socket.")
  local chat_buf = vim.api.nvim_get_current_buf()
  wait_for("the chat reply", function()
    local lines = vim.api.nvim_buf_get_lines(chat_buf, 0, -1, false)
    local users = 0
    for _, l in ipairs(lines) do
      if l == "## user" then
        users = users + 1
      end
    end
    chat_done = users == 2
    return chat_done
  end, 20000)
  local chat_text = table.concat(vim.api.nvim_buf_get_lines(chat_buf, 0, -1, false), "\n")
  local reply = chat_text:match("## assistant\n(.*)\n\n## user\n$")
  vim.cmd("MlxdModels")
  vim.cmd("MlxdStatus")
  wait_for(":MlxdModels and :MlxdStatus output", function()
    local m = vim.fn.execute("messages")
    return m:find("mlxd models:", 1, true) and m:find("daemon: up", 1, true)
  end, 5000)
  local messages = vim.fn.execute("messages")
  vim.api.nvim_set_current_win(code_win)

  write_json("trace1.json", TRACE)
  TRACE = {}
  write_json("phase1.json", {
    prefix = prefix,
    suffix = suffix,
    suggestion = s.text,
    finish_reason = s.done.finish_reason,
    shown = text_shown,
    extmarks = marks,
    after_accept = after_accept,
    latencies_ms = latencies,
    keystrokes = #cfg.text,
    stats = stats,
    chat_prompt = "Say hello to the socket.",
    chat_reply = reply,
    messages = messages,
  })

  -- 3. The daemon goes away: one message, however many keys are typed.
  touch("ready_for_restart")
  wait_for("the daemon to stop", function()
    return vim.fn.filereadable(cfg.sync .. "/stopped") == 1
  end, 60000)
  vim.api.nvim_win_set_cursor(0, { 1, 0 })
  vim.api.nvim_input("A")
  wait_for("insert mode", function()
    return vim.fn.mode() == "i"
  end, 2000)
  local failed_before = mlxd.suggest.stats.failed
  for _, key in ipairs({ " ", "#", " " }) do
    vim.api.nvim_input(key)
    sleep(300)
  end
  local down = {
    notes = vim.deepcopy(notes),
    failed = mlxd.suggest.stats.failed - failed_before,
    state = mlxd.client.state,
  }
  touch("down_checked")
  wait_for("the daemon to restart", function()
    return vim.fn.filereadable(cfg.sync .. "/restarted") == 1
  end, 60000)

  -- 4. Back: the next keystrokes complete again (mid-buffer, so through FIM).
  local keys = 0
  local letters = "abcdefghijklmnopqrst"
  while not mlxd.suggest.current() do
    keys = keys + 1
    if keys > #letters then
      error("no completion after the restart")
    end
    vim.api.nvim_input(letters:sub(keys, keys))
    local t = uv.now()
    while not mlxd.suggest.current() and uv.now() - t < 500 do
      sleep(10)
    end
  end
  local s2 = finished_suggestion(20000)
  local prefix2, suffix2 = around_cursor()
  write_json("trace2.json", TRACE)
  write_json("phase2.json", {
    down = down,
    keys_to_recover = keys,
    prefix = prefix2,
    suffix = suffix2,
    suggestion = s2.text,
    fim = s2.done.fim,
    notes = notes,
    state = mlxd.client.state,
  })
end

co = coroutine.create(function()
  local ok, err = xpcall(script, debug.traceback)
  if not ok then
    write_json("error.json", { error = tostring(err) })
  end
  vim.cmd("qa!")
end)
vim.schedule(function()
  assert(coroutine.resume(co))
end)
