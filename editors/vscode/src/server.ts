// How the extension reaches `ghostline serve`, the settings it sends and what it reports back. No
// `vscode` import here, so the node test (test/server.test.js) runs exactly this code.
import { ChildProcess, spawn } from 'child_process';
import * as net from 'net';

export const STATUS = 'ghostline/status';
export const DID_ACCEPT = 'ghostline/didAccept';
export const DID_REJECT = 'ghostline/didReject';

/** The payload of `ghostline/status`. */
export interface Status {
  state: 'loading' | 'ready' | 'busy' | 'error';
  message: string;
  model: string;
}

/** What the server understands (`initializationOptions`, `workspace/didChangeConfiguration`). */
export interface ServerSettings {
  model: string | null;
  engine: string;
  engine_token_file: string | null;
  multiline: 'auto' | 'always' | 'never';
  max_tokens: number;
  max_tokens_multiline: number;
  debounce_ms: number;
  time_cap_ms: number | null;
  drafts: number;
  decoder: string;
  decoder_multiline: string;
  precision: 'int8' | 'fp32';
  head: 'code' | 'full';
  halt: boolean;
  halt_threshold: number | null;
  exit: boolean;
  exit_threshold: number | null;
  gate: boolean;
  gate_strength: number;
  memory_budget_mb: number;
  idle_refresh_ms: number;
  completion_items: boolean;
  context: boolean;
  context_budget: number;
  context_workspace: boolean;
  context_open_files: boolean;
  context_edits: boolean;
  fim: boolean;
}

/** Settings the server reads only when it starts: changing one restarts it. */
export const RESTART_SETTINGS = [
  'serverPath', 'serverArgs', 'serverAddress', 'model', 'engine', 'engineTokenFile', 'precision', 'head',
  'completionItems',
];

/** How to start or reach the server. */
export interface Launch {
  serverPath: string;
  serverArgs: string[];
  serverAddress: string; // "host:port" of a running `ghostline serve --tcp`; empty: spawn one
}

type Get = <T>(key: string, fallback: T) => T;

/** `ghostline.*` settings (camelCase, as VS Code shows them) to the server's snake_case keys. */
export function serverSettings(get: Get): ServerSettings {
  return {
    model: get<string | null>('model', null) || null,
    engine: get('engine', 'daemon') || 'daemon',
    engine_token_file: get<string | null>('engineTokenFile', null) || null,
    multiline: get('multiline', 'auto'),
    max_tokens: get('maxTokens', 48),
    max_tokens_multiline: get('maxTokensMultiline', 96),
    debounce_ms: get('debounceMs', 25),
    time_cap_ms: get<number | null>('timeCapMs', 1500),
    drafts: get('drafts', 3),
    decoder: get('decoder', 'greedy'),
    decoder_multiline: get('decoderMultiline', 'greedy'),
    precision: get<'int8' | 'fp32'>('precision', 'int8'),
    head: get<'code' | 'full'>('head', 'code'),
    halt: get('halt', false),
    halt_threshold: get<number | null>('haltThreshold', null),
    exit: get('exit', false),
    exit_threshold: get<number | null>('exitThreshold', null),
    gate: get('gate', true),
    gate_strength: get('gateStrength', 1),
    memory_budget_mb: get('memoryBudgetMb', 2048),
    idle_refresh_ms: get('idleRefreshMs', 600),
    completion_items: get('completionItems', false),
    context: get('context', false),
    context_budget: get('contextBudget', 1536),
    context_workspace: get('contextWorkspace', true),
    context_open_files: get('contextOpenFiles', true),
    context_edits: get('contextEdits', true),
    fim: get('fim', true),
  };
}

export function launch(get: Get): Launch {
  return {
    serverPath: get('serverPath', 'ghostline') || 'ghostline',
    serverArgs: get<string[]>('serverArgs', []),
    serverAddress: get('serverAddress', '').trim(),
  };
}

/**
 * The server's command line after `serverPath`: `serve` and then `serverArgs` (`--engine in-process`, ...).
 * A Python interpreter runs `-m ghostline serve ...`; `serverArgs` holding `serve` is a whole command
 * line, used as it is; a leading `-m ghostline` stays in front of `serve`.
 */
export function serverCommand(l: Launch): string[] {
  const args = [...l.serverArgs];
  if (args.includes('serve')) {
    return args;
  }
  const python = /^python[0-9.]*(\.exe)?$/i.test(l.serverPath.split(/[\\/]/).pop() ?? '');
  const moduleFlag = args[0] === '-m' && args[1] === 'ghostline';
  const head = moduleFlag ? args.splice(0, 2) : python ? ['-m', 'ghostline'] : [];
  return [...head, 'serve', ...args];
}

/** Spawns the server (`serverCommand`), speaking LSP on stdio; its stderr is the server log. */
export function spawnServer(l: Launch, env: NodeJS.ProcessEnv = process.env, cwd?: string): ChildProcess {
  return spawn(l.serverPath, serverCommand(l), { env, cwd, stdio: ['pipe', 'pipe', 'pipe'] });
}

/** Connects to a server started with `ghostline serve --tcp host:port`. */
export function connectServer(address: string): Promise<net.Socket> {
  const i = address.lastIndexOf(':');
  const host = i > 0 ? address.slice(0, i) : '127.0.0.1';
  const port = Number(address.slice(i + 1));
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host, port }, () => resolve(socket));
    socket.once('error', reject);
  });
}

export type LogLevel = 'trace' | 'debug' | 'info' | 'warn' | 'error';

const LOG_LINE = /^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (\S+) (DEBUG|INFO|WARNING|ERROR|CRITICAL) /;
const LEVELS: Record<string, LogLevel> = { DEBUG: 'debug', INFO: 'info', WARNING: 'warn', ERROR: 'error', CRITICAL: 'error' };

/**
 * Sorts the server's stderr lines for the output channel: each at its own level, and none that the
 * server also sends as `window/logMessage` (its `ghostline.*` records once the client is connected),
 * so nothing shows twice. A line of a dropped record's traceback goes with it; a line that is not a
 * log record (a crash, a usage error) is an error.
 */
export class StderrLog {
  private dropping = false;

  constructor(private connected: () => boolean) {}

  /** The level to log `line` at, or undefined to drop it. */
  level(line: string): LogLevel | undefined {
    const m = LOG_LINE.exec(line);
    if (!m) {
      return this.dropping ? undefined : 'error';
    }
    this.dropping = m[1].startsWith('ghostline') && this.connected();
    return this.dropping ? undefined : LEVELS[m[2]];
  }
}

export interface Position {
  line: number;
  character: number;
}

/** The text from a position to the cursor (or to an edit), undefined if the position is past it. */
export type TextFrom = (from: Position) => string | undefined;

interface Shown {
  origin: Position; // where the suggestion started
  full: string; // the whole suggestion from `origin`
  consumed: number; // characters of `full` in the document since: typed or accepted
  accepted: number; // of those, taken by partial accepts (accept word, accept line)
}

/** `from` moved on by `text` (its line breaks included). */
export function advance(from: Position, text: string): Position {
  const lines = text.split('\n');
  return lines.length === 1
    ? { line: from.line, character: from.character + text.length }
    : { line: from.line + lines.length - 1, character: lines[lines.length - 1].length };
}

function same(a: Position, b: Position): boolean {
  return a.line === b.line && a.character === b.character;
}

/**
 * Reports what became of each suggestion, once. `didAccept` when an item's command ran (Tab: the whole
 * suggestion from where it started); when part of it was taken with accept word / accept line and
 * the user then went elsewhere, `didAccept` with `partial: true`, `text` the part of the suggestion
 * now in the document and `accepted` the characters taken by those accepts. `didReject` when the
 * suggestion is gone and nothing was taken: the server reads the document to tell one the user typed
 * (at least a word of it) from one they did not keep. Typing through a suggestion keeps it shown.
 */
export class Outcomes {
  private shown = new Map<string, Shown>();

  constructor(private send: (method: string, params: object) => void) {}

  /** A new request at the cursor; `typed` gives the text from a position to the cursor. */
  requested(uri: string, typed: TextFrom): void {
    const s = this.shown.get(uri);
    if (!s) {
      return;
    }
    const t = typed(s.origin);
    if (t !== undefined && s.full.startsWith(t) && t.length < s.full.length) {
      s.consumed = t.length;
      return;
    }
    this.shown.delete(uri);
    this.conclude(uri, s);
  }

  /** The first item of an answer: the rest of the shown suggestion, or a new one. */
  offered(uri: string, position: Position, text: string): void {
    const s = this.shown.get(uri);
    if (s && s.full.slice(s.consumed) === text && same(advance(s.origin, s.full.slice(0, s.consumed)), position)) {
      return;
    }
    if (s && s.accepted > 0) {
      this.conclude(uri, s);
    }
    this.shown.set(uri, { origin: position, full: text, consumed: 0, accepted: 0 });
  }

  /** `text` was inserted at `at`: more than one character that continues the suggestion is a partial accept. */
  inserted(uri: string, at: Position, text: string, before: TextFrom): void {
    const s = this.shown.get(uri);
    const t = s && text.length > 1 ? before(s.origin) : undefined;
    if (s && t !== undefined && s.full.startsWith(t + text) && same(advance(s.origin, t), at)) {
      s.accepted += text.length;
      s.consumed = t.length + text.length;
    }
  }

  /** An item's command ran: its text is in the document from `position`. */
  accepted(uri: string, position: Position, text: string): void {
    const s = this.shown.get(uri);
    this.shown.delete(uri);
    const whole = s && s.full.endsWith(text) && same(advance(s.origin, s.full.slice(0, s.full.length - text.length)), position);
    this.send(DID_ACCEPT, s && whole ? { uri, position: s.origin, text: s.full } : { uri, position, text });
  }

  private conclude(uri: string, s: Shown): void {
    if (s.accepted > 0) {
      this.send(DID_ACCEPT, { uri, position: s.origin, text: s.full.slice(0, s.consumed), partial: true, accepted: s.accepted });
    } else {
      this.send(DID_REJECT, { uri, position: s.origin, text: s.full });
    }
  }
}
