--- Ghostline for Neovim 0.12+: starts `ghostline serve` for code buffers and shows its suggestions as
--- ghost text through Neovim's own LSP inline completion (`vim.lsp.inline_completion`).
local M = {}

local api, lsp = vim.api, vim.lsp
local ic = lsp.inline_completion

M.defaults = {
  cmd = { "ghostline", "serve" },
  filetypes = { "python", "lua", "javascript", "typescript", "go", "rust", "c", "cpp", "java" },
  root_markers = { ".git", "pyproject.toml", "package.json", "go.mod", "Cargo.toml" },
  -- Sent as initializationOptions (README: Settings): model, multiline, max_tokens, debounce_ms, time_cap_ms,
  -- drafts, decoder, decoder_multiline, precision, head, halt, halt_threshold, exit, exit_threshold,
  -- memory_budget_mb, engine.
  settings = {},
  -- Insert-mode keys; each falls through to its normal meaning when no suggestion is shown. false disables one.
  keymaps = {
    accept = "<Tab>",
    accept_word = "<M-Right>",
    accept_line = "<M-C-Right>",
    next = "<M-]>",
    prev = "<M-[>",
    dismiss = "<C-]>",
  },
}

M.config = vim.deepcopy(M.defaults)
M.last_status = nil ---@type {state: string, message: string, model: string}?

--- The suggestions last shown per buffer, to report them as accepted or rejected exactly once.
---@type table<integer, {client_id: integer, uri: string, position: lsp.Position, items: table[], index: integer}>
local shown = {}

--- Settings as a JSON object even when empty (an empty Lua table encodes as a JSON array).
local function object(t)
  return next(t) and t or vim.empty_dict()
end

local function text_of(item)
  local t = item.insert_text
  return type(t) == "table" and t.value or t
end

--- The part of `item` not in the buffer yet: its text less what was typed since its range starts, nil if
--- the typing went another way or the cursor left it (another line, or before where it starts).
local function remainder(bufnr, item)
  local text, r = text_of(item), item.range
  if not r then
    return text
  end
  local row, col = unpack(api.nvim_win_get_cursor(0))
  if r.start.row ~= row - 1 or r.start.col > col then
    return nil
  end
  local typed = api.nvim_buf_get_lines(bufnr, row - 1, row, true)[1]:sub(r.start.col + 1, col)
  return vim.startswith(text, typed) and text:sub(#typed + 1) or nil
end

--- Sends `ghostline/didAccept` or `ghostline/didReject` for the suggestion shown in `bufnr`, then forgets it.
local function settle(bufnr, method, text)
  local s = shown[bufnr]
  shown[bufnr] = nil
  local client = s and lsp.get_client_by_id(s.client_id)
  text = text or (s and text_of(s.items[s.index]))
  if client and text and text ~= "" then
    client:notify(method, { uri = s.uri, position = s.position, text = text })
  end
end

--- Watches this client's inline completion replies (Neovim keeps them private) to know what is shown.
local function track(client)
  local request = client.request
  client.request = function(self, method, params, handler, bufnr)
    if method == "textDocument/inlineCompletion" and handler then
      local inner = handler
      handler = function(err, result, ctx, ...)
        local buf = ctx.bufnr
        local rest = shown[buf] and remainder(buf, shown[buf].items[shown[buf].index])
        if shown[buf] and (rest == nil or rest == "") then -- typed past or to its end: the server tells which
          settle(buf, "ghostline/didReject")
        end
        local items = {}
        for _, it in ipairs(not err and result and (result.items or result) or {}) do
          local range = it.range and vim.range.lsp(buf, it.range, client.offset_encoding)
          table.insert(items, { insert_text = it.insertText, range = range })
        end
        shown[buf] = #items > 0
            and { client_id = client.id, uri = params.textDocument.uri, position = params.position, items = items, index = 1 }
          or nil
        return inner(err, result, ctx, ...)
      end
    end
    return request(self, method, params, handler, bufnr)
  end
end

--- Inserts `text` at the cursor and moves the cursor after it.
local function insert(bufnr, text)
  local row, col = unpack(api.nvim_win_get_cursor(0))
  local lines = vim.split(text, "\n", { plain = true })
  api.nvim_buf_set_text(bufnr, row - 1, col, row - 1, col, lines)
  api.nvim_win_set_cursor(0, { row + #lines - 1, (#lines == 1 and col or 0) + #lines[#lines] })
end

--- Accepts the shown suggestion, or the part of it that `cut` keeps. Returns false when none is shown.
function M.accept(cut, bufnr)
  bufnr = bufnr or api.nvim_get_current_buf()
  return ic.get({
    bufnr = bufnr,
    on_accept = function(item)
      local text = text_of(item)
      local rest = remainder(bufnr, item) or text
      local typed = text:sub(1, #text - #rest) -- typed since the suggestion was shown: part of what is accepted
      if cut then
        rest = cut(rest)
        insert(bufnr, rest)
      elseif type(item.insert_text) == "table" then
        vim.snippet.expand(item.insert_text.value)
      elseif item.range then
        local r, lines = item.range, vim.split(item.insert_text, "\n", { plain = true })
        api.nvim_buf_set_text(bufnr, r.start.row, r.start.col, r.end_.row, r.end_.col, lines)
        api.nvim_win_set_cursor(0, { r.start.row + #lines, (#lines == 1 and r.start.col or 0) + #lines[#lines] })
      else
        insert(bufnr, item.insert_text)
      end
      if shown[bufnr] and shown[bufnr].client_id == item.client_id then -- not another server's item
        settle(bufnr, "ghostline/didAccept", typed .. rest)
      end
    end,
  })
end

--- The next word (with the blanks before it) or the next line of a suggestion.
function M.word(text)
  return text:match("^%s*[%w_]+") or text:match("^%s*[^%w_%s]+") or text
end

function M.line(text)
  return text:match("^\n?[^\n]*")
end

--- Hides the shown suggestion and reports it as rejected.
function M.dismiss(bufnr)
  bufnr = bufnr or api.nvim_get_current_buf()
  return ic.get({
    bufnr = bufnr,
    on_accept = function()
      settle(bufnr, "ghostline/didReject")
    end,
  })
end

--- Shows the next (count 1) or previous (count -1) draft.
function M.cycle(count, bufnr)
  bufnr = bufnr or api.nvim_get_current_buf()
  local s = shown[bufnr]
  if not s then
    return false
  end
  vim.schedule(function() -- keymaps run under textlock
    ic.select({ bufnr = bufnr, count = count })
  end)
  s.index = (s.index - 1 + count) % #s.items + 1
  return true
end

--- One line for statuslines and `:GhostlineStatus`.
function M.status()
  local s = M.last_status
  if not s then
    return "ghostline: no status yet"
  end
  return ("ghostline: %s (%s)%s"):format(s.state, s.model or "?", (s.message or "") ~= "" and " " .. s.message or "")
end

--- Changes settings on the running servers (`workspace/didChangeConfiguration`).
function M.configure(settings)
  M.config.settings = vim.tbl_deep_extend("force", M.config.settings, settings)
  for _, client in ipairs(lsp.get_clients({ name = "ghostline" })) do
    client.settings = { ghostline = object(M.config.settings) }
    client:notify("workspace/didChangeConfiguration", { settings = client.settings })
  end
end

local function map(bufnr, lhs, fn, desc)
  if lhs then
    vim.keymap.set("i", lhs, function()
      return fn(bufnr) and "" or lhs
    end, { buffer = bufnr, expr = true, desc = "Ghostline: " .. desc })
  end
end

local function start(bufnr)
  local c = M.config
  local id = lsp.start({
    name = "ghostline",
    cmd = c.cmd,
    root_dir = vim.fs.root(bufnr, c.root_markers) or vim.uv.cwd(),
    init_options = object(c.settings),
    settings = { ghostline = object(c.settings) },
    on_init = track,
    handlers = {
      ["ghostline/status"] = function(_, params)
        M.last_status = params
        api.nvim_exec_autocmds("User", { pattern = "GhostlineStatus", data = params, modeline = false })
      end,
    },
  }, { bufnr = bufnr })
  if not id then
    return
  end
  local k = c.keymaps
  map(bufnr, k.accept, function(b) return M.accept(nil, b) end, "accept suggestion")
  map(bufnr, k.accept_word, function(b) return M.accept(M.word, b) end, "accept word")
  map(bufnr, k.accept_line, function(b) return M.accept(M.line, b) end, "accept line")
  map(bufnr, k.next, function(b) return M.cycle(1, b) end, "next draft")
  map(bufnr, k.prev, function(b) return M.cycle(-1, b) end, "previous draft")
  map(bufnr, k.dismiss, M.dismiss, "dismiss suggestion")
end

function M.setup(opts)
  opts = opts or {}
  M.config = vim.tbl_deep_extend("force", vim.deepcopy(M.defaults), opts)
  for key, value in pairs(opts) do
    if vim.islist(value) then -- lists replace the default instead of merging into it by index
      M.config[key] = value
    end
  end
  ic.enable()
  local group = api.nvim_create_augroup("ghostline", { clear = true })
  api.nvim_create_autocmd("FileType", {
    group = group,
    pattern = M.config.filetypes,
    callback = function(ev)
      start(ev.buf)
    end,
  })
  api.nvim_create_autocmd("InsertLeave", {
    group = group,
    callback = function(ev)
      settle(ev.buf, "ghostline/didReject")
    end,
  })
  api.nvim_create_autocmd("BufUnload", {
    group = group,
    callback = function(ev)
      shown[ev.buf] = nil
    end,
  })
  api.nvim_create_user_command("GhostlineStatus", function()
    vim.notify(M.status())
  end, { desc = "Show the last ghostline/status" })
  for _, buf in ipairs(api.nvim_list_bufs()) do
    if api.nvim_buf_is_loaded(buf) and vim.list_contains(M.config.filetypes, vim.bo[buf].filetype) then
      start(buf)
    end
  end
end

return M
