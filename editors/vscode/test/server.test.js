// The extension's client side against the real server, without VS Code: start `ghostline serve` with
// the extension's own spawn code (out/server.js), then speak LSP over vscode-languageserver-protocol.
// GHOSTLINE_PYTHON names the interpreter that has the `lsp` package (default: the repo's .venv).
const { test } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const {
  createMessageConnection,
  StreamMessageReader,
  StreamMessageWriter,
  InitializeRequest,
  InitializedNotification,
  DidOpenTextDocumentNotification,
  InlineCompletionRequest,
  InlineCompletionTriggerKind,
  ShutdownRequest,
  ExitNotification,
  WorkDoneProgressCreateRequest,
} = require('vscode-languageserver-protocol/node');
const {
  spawnServer, launch, serverSettings, serverCommand, Outcomes, StderrLog, STATUS, DID_ACCEPT, DID_REJECT,
} = require('../out/server.js');

const ROOT = path.resolve(__dirname, '..', '..', '..');
const PYTHON = process.env.GHOSTLINE_PYTHON || path.join(ROOT, '.venv', 'bin', 'python');
const SNIPPET = [
  'def average(numbers):',
  '    """The mean of a list of numbers."""',
  '    total = sum(numbers)',
  '    return ',
  '',
].join('\n');

/** Rejects after `ms` with `what` so every wait is bounded. */
function within(ms, what, promise) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

test('settings map to the server keys', () => {
  const user = { model: 'smollm2-135m', maxTokens: 16, timeCapMs: null, memoryBudgetMb: 512 };
  const get = (key, fallback) => (key in user ? user[key] : fallback);
  assert.deepEqual(serverSettings(get), {
    model: 'smollm2-135m', engine: 'daemon', engine_token_file: null, multiline: 'auto', max_tokens: 16,
    max_tokens_multiline: 96, debounce_ms: 25, time_cap_ms: null, drafts: 3, decoder: 'greedy',
    decoder_multiline: 'greedy', precision: 'int8', head: 'code', halt: false, halt_threshold: null, exit: false,
    exit_threshold: null, gate: true, gate_strength: 1, memory_budget_mb: 512, idle_refresh_ms: 600,
    completion_items: false, context: false, context_budget: 1536, context_workspace: true, context_open_files: true,
    context_edits: true, fim: true,
  });
  assert.deepEqual(launch((key, fallback) => fallback), { serverPath: 'ghostline', serverArgs: [], serverAddress: '' });
});

test('every server setting has a ghostline.* setting in package.json', () => {
  const props = require('../package.json').contributes.configuration.properties;
  const camel = (k) => k.replace(/_([a-z])/g, (_, c) => c.toUpperCase());
  for (const key of Object.keys(serverSettings((k, fallback) => fallback))) {
    const p = props[`ghostline.${camel(key)}`];
    assert.ok(p, `ghostline.${camel(key)} missing`);
    assert.ok(p.description || p.markdownDescription, `ghostline.${camel(key)} has no description`);
  }
});

test('the server command: serve first, then serverArgs', () => {
  const cmd = (serverPath, serverArgs) => serverCommand({ serverPath, serverArgs, serverAddress: '' });
  assert.deepEqual(cmd('ghostline', ['--engine', 'in-process']), ['serve', '--engine', 'in-process']);
  assert.deepEqual(cmd('/venv/bin/python', ['--engine', 'in-process']), ['-m', 'ghostline', 'serve', '--engine', 'in-process']);
  assert.deepEqual(cmd('/venv/bin/python3.11', ['-m', 'ghostline']), ['-m', 'ghostline', 'serve']);
  assert.deepEqual(cmd('ghostline', ['serve', '--engine', 'in-process']), ['serve', '--engine', 'in-process']);
});

test('stderr lines the server also logs to the client are dropped, the rest keep their level', () => {
  let connected = false;
  const log = new StderrLog(() => connected);
  const line = (name, level) => `2026-12-05 10:00:00,123 ${name} ${level} something`;
  assert.equal(log.level(line('ghostline.server', 'INFO')), 'info');  // before initialize: only on stderr
  connected = true;
  assert.equal(log.level(line('ghostline.server', 'INFO')), undefined);
  assert.equal(log.level('Traceback (most recent call last):'), undefined);  // part of the dropped record
  assert.equal(log.level(line('pygls.protocol', 'WARNING')), 'warn');
  assert.equal(log.level('ghostline: error: unrecognized arguments: serve'), 'error');
});

test('outcomes: typed through, partial accept, accept, reject', () => {
  const sent = [];
  const o = new Outcomes((method, params) => sent.push([method, params]));
  const uri = 'file:///a.py';
  const doc = { text: '' };
  const typed = (from) => doc.text.slice(from.character);  // one line, the cursor at its end
  o.requested(uri, typed);
  o.offered(uri, { line: 0, character: 0 }, 'in text if c]');
  doc.text = 'i';
  o.requested(uri, typed);  // typed through: still shown
  o.offered(uri, { line: 0, character: 1 }, 'n text if c]');
  assert.deepEqual(sent, []);
  o.inserted(uri, { line: 0, character: 1 }, 'n ', typed);  // accept word
  doc.text = 'in ';
  o.requested(uri, typed);
  o.offered(uri, { line: 0, character: 3 }, 'text if c]');
  doc.text = 'in x';
  o.requested(uri, typed);  // went elsewhere: the part taken is reported
  assert.deepEqual(sent, [[DID_ACCEPT, { uri, position: { line: 0, character: 0 }, text: 'in ', partial: true, accepted: 2 }]]);
  o.offered(uri, { line: 0, character: 4 }, ' = 1');
  doc.text = 'in xy';
  o.requested(uri, typed);
  assert.deepEqual(sent[1], [DID_REJECT, { uri, position: { line: 0, character: 4 }, text: ' = 1' }]);
  o.offered(uri, { line: 0, character: 5 }, 'z()');
  o.accepted(uri, { line: 0, character: 5 }, 'z()');
  assert.deepEqual(sent[2], [DID_ACCEPT, { uri, position: { line: 0, character: 5 }, text: 'z()' }]);
  o.offered(uri, { line: 0, character: 8 }, '+1');
  doc.text = 'in xyz()+1';
  o.requested(uri, typed);  // typed to its end: reported too, the server tells typed from rejected
  assert.deepEqual(sent[3], [DID_REJECT, { uri, position: { line: 0, character: 8 }, text: '+1' }]);
});

test('initialize, open, inline completion, accept, shutdown', { skip: !fs.existsSync(PYTHON) && `no Python at ${PYTHON}`, timeout: 300000 }, async () => {
  const settings = { model: 'smollm2-135m', maxTokens: 16, multiline: 'never' };
  const get = (key, fallback) => (key in settings ? settings[key] : fallback);
  const proc = spawnServer(
    { serverPath: PYTHON, serverArgs: ['-m', 'ghostline'], serverAddress: '' },
    { ...process.env, PYTHONPATH: ROOT },
    ROOT,
  );
  let log = '';
  proc.stderr.on('data', (d) => { log = (log + d).slice(-6000); });
  const exited = new Promise((resolve) => proc.on('exit', (code) => resolve(code)));
  const conn = createMessageConnection(new StreamMessageReader(proc.stdout), new StreamMessageWriter(proc.stdin));
  const statuses = [];
  let progress = 0;
  const ready = new Promise((resolve, reject) => {
    conn.onNotification(STATUS, (s) => {
      statuses.push(s.state);
      if (s.state === 'ready') resolve(s);
      if (s.state === 'error') reject(new Error(`server error: ${s.message}`));
    });
  });
  conn.onRequest(WorkDoneProgressCreateRequest.type, () => null);
  conn.onNotification('$/progress', () => { progress += 1; });
  conn.onNotification('window/logMessage', () => {});
  conn.listen();

  try {
    const init = await within(60000, 'initialize', conn.sendRequest(InitializeRequest.type, {
      processId: process.pid,
      rootUri: null,
      capabilities: { window: { workDoneProgress: true }, general: { positionEncodings: ['utf-16'] } },
      initializationOptions: serverSettings(get),
    }));
    const caps = init.capabilities;
    assert.ok(caps.inlineCompletionProvider, 'inlineCompletionProvider is advertised');
    assert.equal(caps.completionProvider, undefined, 'no completionProvider: ghost text only');
    const sync = typeof caps.textDocumentSync === 'number' ? caps.textDocumentSync : caps.textDocumentSync.change;
    assert.equal(sync, 2, 'incremental sync');
    await conn.sendNotification(InitializedNotification.type, {});
    const status = await within(240000, 'ghostline/status ready', ready);
    assert.match(status.model, /smollm2|SmolLM2/i);

    const uri = 'file:///tmp/ghostline-vscode-test/average.py';
    await conn.sendNotification(DidOpenTextDocumentNotification.type, {
      textDocument: { uri, languageId: 'python', version: 1, text: SNIPPET },
    });
    const position = { line: 3, character: 11 };
    const result = await within(60000, 'textDocument/inlineCompletion', conn.sendRequest(InlineCompletionRequest.type, {
      textDocument: { uri },
      position,
      context: { triggerKind: InlineCompletionTriggerKind.Invoked },
    }));
    const items = Array.isArray(result) ? result : result.items;
    assert.ok(items.length > 0, 'at least one inline completion item');
    const text = typeof items[0].insertText === 'string' ? items[0].insertText : items[0].insertText.value;
    assert.ok(text.trim().length > 0, 'a non-empty suggestion');
    console.log(`suggestion at 3:11: ${JSON.stringify(text)} (statuses ${statuses.join(',')}, ${progress} progress messages)`);

    // The accept path of the extension: the item's command reports it through the same Outcomes.
    const sent = [];
    const outcomes = new Outcomes((method, params) => { sent.push(method); void conn.sendNotification(method, params); });
    outcomes.requested(uri, () => undefined);
    outcomes.offered(uri, position, text);
    outcomes.accepted(uri, position, text);
    assert.deepEqual(sent, [DID_ACCEPT]);

    await within(30000, 'shutdown', conn.sendRequest(ShutdownRequest.type));
    await conn.sendNotification(ExitNotification.type);
    assert.equal(await within(30000, 'the server to exit', exited), 0);
  } catch (err) {
    err.message += `\n--- server log (tail):\n${log}`;
    throw err;
  } finally {
    conn.dispose();
    proc.kill();
  }
});
