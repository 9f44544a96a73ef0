-- mlxd.chat: a chat in a scratch buffer, the reply streamed into it.
--
-- The buffer is the conversation: sections headed `## system`, `## user` and
-- `## assistant`, so earlier turns can be edited before the next is sent. `:MlxdChat TEXT`
-- (or <CR> in normal mode, for the text under the last `## user`) sends the conversation
-- as `messages` and streams the reply under a new `## assistant`. <C-c> stops it.
--
-- Threading: Neovim's main loop only.

local M = {}

local S = { client = nil, config = nil, buf = nil, streaming = nil }

local NAME = "mlxd://chat"

local function get_buf()
  if S.buf and vim.api.nvim_buf_is_valid(S.buf) then
    return S.buf
  end
  local buf = vim.api.nvim_create_buf(false, true)
  vim.api.nvim_buf_set_name(buf, NAME)
  vim.bo[buf].filetype = "markdown"
  vim.bo[buf].bufhidden = "hide"
  local lines = {}
  if S.config.chat.system then
    vim.list_extend(lines, { "## system", S.config.chat.system, "" })
  end
  vim.list_extend(lines, { "## user", "" })
  vim.api.nvim_buf_set_lines(buf, 0, -1, false, lines)
  vim.keymap.set("n", "<CR>", function()
    M.send()
  end, { buffer = buf, desc = "mlxd: send the chat" })
  vim.keymap.set({ "n", "i" }, "<C-c>", M.stop, { buffer = buf, desc = "mlxd: stop the reply" })
  S.buf = buf
  return buf
end

--- Show the chat buffer in a window (a split, unless one shows it already).
function M.open()
  local buf = get_buf()
  for _, win in ipairs(vim.api.nvim_list_wins()) do
    if vim.api.nvim_win_get_buf(win) == buf then
      vim.api.nvim_set_current_win(win)
      return buf
    end
  end
  vim.cmd("botright split")
  vim.api.nvim_win_set_buf(0, buf)
  return buf
end

--- The conversation in the buffer, as protocol `messages`.
function M.messages(buf)
  local messages, current = {}, nil
  for _, line in ipairs(vim.api.nvim_buf_get_lines(buf, 0, -1, false)) do
    local role = line:match("^## (%a+)%s*$")
    if role == "system" or role == "user" or role == "assistant" then
      current = { role = role, lines = {} }
      table.insert(messages, current)
    elseif current then
      table.insert(current.lines, line)
    end
  end
  local out = {}
  for _, m in ipairs(messages) do
    local content = vim.trim(table.concat(m.lines, "\n"))
    if content ~= "" then
      table.insert(out, { role = m.role, content = content })
    end
  end
  return out
end

local function append(buf, text)
  local last = vim.api.nvim_buf_line_count(buf) - 1
  local col = #(vim.api.nvim_buf_get_lines(buf, last, last + 1, false)[1] or "")
  vim.api.nvim_buf_set_text(buf, last, col, last, col, vim.split(text, "\n", { plain = true }))
end

--- Send the conversation (after adding `text` as the user's turn, if given) and stream
--- the reply. `on_done(message)` is called with the request's done or error.
function M.send(text, on_done)
  local buf = get_buf()
  if S.streaming then
    vim.notify("mlxd: a reply is still streaming (<C-c> stops it)", vim.log.levels.WARN)
    return
  end
  if text and text ~= "" then
    append(buf, text)
  end
  local messages = M.messages(buf)
  if #messages == 0 or messages[#messages].role ~= "user" then
    vim.notify("mlxd: nothing to send: write under the last '## user'", vim.log.levels.WARN)
    return
  end
  append(buf, "\n\n## assistant\n")
  local cfg = S.config.chat
  local id
  id = S.client:request({
    type = "generate",
    messages = messages,
    max_tokens = cfg.max_tokens,
    temperature = cfg.temperature,
    model = cfg.model or S.config.model,
  }, {
    on_message = function(msg)
      if msg.type == "chunk" and msg.text ~= "" and vim.api.nvim_buf_is_valid(buf) then
        append(buf, msg.text)
      end
    end,
    on_end = function(msg)
      S.streaming = nil
      if not vim.api.nvim_buf_is_valid(buf) then
        return
      end
      if msg.type == "error" then
        append(buf, "\n[mlxd: " .. msg.code .. ": " .. tostring(msg.message) .. "]")
      elseif msg.finish_reason == "cancelled" then
        append(buf, "\n[stopped]")
      end
      append(buf, "\n\n## user\n")
      for _, win in ipairs(vim.api.nvim_list_wins()) do
        if vim.api.nvim_win_get_buf(win) == buf then
          vim.api.nvim_win_set_cursor(win, { vim.api.nvim_buf_line_count(buf), 0 })
        end
      end
      if on_done then
        on_done(msg)
      end
    end,
  })
  if S.client:in_flight(id) then
    S.streaming = id
  end
end

--- Stop the reply being streamed.
function M.stop()
  if S.streaming then
    S.client:cancel(S.streaming)
  end
end

function M.setup(client, config)
  S.client = client
  S.config = config
end

return M
