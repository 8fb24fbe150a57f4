-- Drives a real Neovim through a Ghostline session, one step per main-loop turn (typed keys and LSP
-- replies are only processed between steps): wait for the model, type, see ghost text, dismiss it,
-- get it again, accept a word, then the rest, then on a new line leave one shown for the line above.
-- Writes what it saw to $GHOSTLINE_TEST_OUT as JSON and quits.
-- Env: GHOSTLINE_TEST_CMD (JSON list), GHOSTLINE_TEST_FILE, GHOSTLINE_TEST_OUT, GHOSTLINE_TEST_TYPE (keys typed
-- after `o` on the last line), GHOSTLINE_TEST_STATS (the server's counts file), GHOSTLINE_TEST_HOLD (stop once
-- ghost text shows, for a screenshot).
local api, env = vim.api, vim.env
local here = vim.fs.dirname(vim.fs.abspath(debug.getinfo(1, "S").source:sub(2)))
vim.opt.runtimepath:prepend(vim.fs.dirname(here))

local out = { steps = {} }
local done = false

local function finish(err)
  if done then
    return
  end
  done = true
  out.error = err
  out.status = require("ghostline").status()
  local f = assert(io.open(env.GHOSTLINE_TEST_OUT, "w"))
  f:write(vim.json.encode(out))
  f:close()
  if not env.GHOSTLINE_TEST_HOLD or err then
    vim.cmd("qa!")
  end
end

--- Calls `next(value)` once `cond()` returns a value, checking every 50 ms for at most `timeout_ms`.
local function poll(what, timeout_ms, cond, next)
  local deadline = vim.uv.hrtime() + timeout_ms * 1e6
  local function tick()
    if done then
      return
    end
    local ok, value = pcall(cond)
    if not ok then
      return finish(what .. ": " .. tostring(value))
    end
    if value then
      table.insert(out.steps, what)
      return next(value)
    end
    if vim.uv.hrtime() > deadline then
      return finish("timed out waiting for " .. what)
    end
    vim.defer_fn(tick, 50)
  end
  vim.defer_fn(tick, 0)
end

--- The ghost text shown in the current buffer, lines joined by "\n", or nil.
local function ghost()
  local ns = api.nvim_get_namespaces()["nvim.lsp.inline_completion"]
  local marks = ns and api.nvim_buf_get_extmarks(0, ns, 0, -1, { details = true }) or {}
  if #marks == 0 then
    return nil
  end
  local function join(chunks)
    local s = ""
    for _, c in ipairs(chunks or {}) do
      if c[2] ~= "ComplHintMore" then
        s = s .. c[1]
      end
    end
    return s
  end
  local d = marks[1][4]
  local lines = { join(d.virt_text) }
  for _, l in ipairs(d.virt_lines or {}) do
    table.insert(lines, join(l))
  end
  local text = table.concat(lines, "\n")
  return text ~= "" and text or nil
end

--- The buffer from the typed line on (it is the last line, so this is all that the test changes).
local function tail()
  return table.concat(api.nvim_buf_get_lines(0, out.row - 1, -1, false), "\n")
end

--- Suggestions the server counted as not taken (rejected or typed), from its counts file.
local function decided()
  local f = io.open(env.GHOSTLINE_TEST_STATS, "r")
  local data = f and vim.json.decode(f:read("*a")) or {}
  if f then
    f:close()
  end
  return (data.rejected or 0) + (data.typed or 0)
end

local function feed(keys)
  api.nvim_feedkeys(vim.keycode(keys), "m", false) -- "m": through mappings, as if typed
end

vim.defer_fn(function()
  finish("overall timeout")
end, tonumber(env.GHOSTLINE_TEST_TIMEOUT_MS or "300000"))

local gl = require("ghostline")

--- Each step: wait (bounded) until its condition holds, then act; the next step starts after.
local steps = {
  { "server ready", 240000, function()
    return gl.last_status and gl.last_status.state ~= "loading" and gl.last_status.state
  end, function(state)
    out.ready_state = state
    out.clients = #vim.lsp.get_clients({ bufnr = 0, name = "ghostline" })
    vim.cmd("normal! G")
    api.nvim_feedkeys("o" .. (env.GHOSTLINE_TEST_TYPE or ""), "n", false)
  end },
  { "ghost text", 60000, function()
    return api.nvim_get_mode().mode == "i" and ghost()
  end, function(text)
    out.row = api.nvim_win_get_cursor(0)[1]
    out.typed = api.nvim_get_current_line()
    out.ghost = text
    if env.GHOSTLINE_TEST_HOLD then
      return finish(nil)
    end
    feed("<C-]>")
  end },
  { "dismissed", 10000, function()
    return not ghost()
  end, function()
    out.after_dismiss = api.nvim_get_current_line()
    feed("<Esc>a") -- back into insert mode at the same place: a new request
  end },
  { "ghost text again", 60000, function()
    return api.nvim_get_mode().mode == "i" and ghost()
  end, function(text)
    out.ghost_again = text
    feed("<M-Right>")
  end },
  { "word accepted", 10000, function()
    return api.nvim_get_current_line() ~= out.typed and api.nvim_get_current_line()
  end, function(line)
    out.after_word = line
  end },
  { "ghost text after the word", 60000, ghost, function(text)
    out.before_accept = tail()
    out.ghost2 = text
    feed("<Tab>")
  end },
  { "suggestion accepted", 10000, function()
    return tail() ~= out.before_accept
  end, function()
    out.after_accept = tail()
    feed("<CR>")
    api.nvim_feedkeys(vim.trim(env.GHOSTLINE_TEST_TYPE or ""), "n", false)
  end },
  { "ghost text on a new line", 60000, function()
    return api.nvim_get_mode().mode == "i" and ghost()
  end, function()
    out.decided = decided()
    feed("<Up><End>#") -- typing elsewhere: a new request, whose reply reports the suggestion left
  end },
  { "the suggestion left reported", 20000, function()
    return decided() > out.decided
  end, function()
    feed("<Esc>")
  end },
  { "normal mode", 5000, function()
    return api.nvim_get_mode().mode == "n"
  end, function() end },
}

local function run(i)
  local step = steps[i]
  if not step then
    return vim.defer_fn(function()
      finish(nil)
    end, 300) -- let the last notifications go out
  end
  poll(step[1], step[2], step[3], function(value)
    step[4](value)
    if not done then
      run(i + 1)
    end
  end)
end

gl.setup({
  cmd = vim.json.decode(env.GHOSTLINE_TEST_CMD),
  settings = { max_tokens = 16, multiline = "never", debounce_ms = 0 },
})
vim.cmd("filetype on")
vim.cmd.edit(vim.fn.fnameescape(env.GHOSTLINE_TEST_FILE))
run(1)
