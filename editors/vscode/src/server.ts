// How the extension reaches `ghostline serve`, and the settings it sends. No `vscode` import here, so
// the node test (test/server.test.js) starts the server with exactly this code.
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
  multiline: 'auto' | 'always' | 'never';
  max_tokens: number;
  debounce_ms: number;
  time_cap_ms: number | null;
  drafts: number;
  decoder: string;
  decoder_multiline: string;
  precision: 'int8' | 'fp32';
  halt: boolean;
  halt_threshold: number | null;
  exit: boolean;
  exit_threshold: number | null;
  memory_budget_mb: number;
}

/** How to start or reach the server. */
export interface Launch {
  serverPath: string;
  serverArgs: string[];
  serverAddress: string; // "host:port" of a running `ghostline serve --tcp`; empty: spawn one
}

/** `ghostline.*` settings (camelCase, as VS Code shows them) to the server's snake_case keys. */
export function serverSettings(get: <T>(key: string, fallback: T) => T): ServerSettings {
  return {
    model: get<string | null>('model', null) || null,
    multiline: get('multiline', 'auto'),
    max_tokens: get('maxTokens', 48),
    debounce_ms: get('debounceMs', 25),
    time_cap_ms: get<number | null>('timeCapMs', 1500),
    drafts: get('drafts', 3),
    decoder: get('decoder', 'greedy'),
    decoder_multiline: get('decoderMultiline', 'lookup'),
    precision: get<'int8' | 'fp32'>('precision', 'int8'),
    halt: get('halt', false),
    halt_threshold: get<number | null>('haltThreshold', null),
    exit: get('exit', false),
    exit_threshold: get<number | null>('exitThreshold', null),
    memory_budget_mb: get('memoryBudgetMb', 2048),
  };
}

export function launch(get: <T>(key: string, fallback: T) => T): Launch {
  return {
    serverPath: get('serverPath', 'ghostline') || 'ghostline',
    serverArgs: get<string[]>('serverArgs', []),
    serverAddress: get('serverAddress', '').trim(),
  };
}

/** Spawns `<serverPath> <serverArgs...> serve`, speaking LSP on stdio; its stderr is the server log. */
export function spawnServer(l: Launch, env: NodeJS.ProcessEnv = process.env, cwd?: string): ChildProcess {
  return spawn(l.serverPath, [...l.serverArgs, 'serve'], { env, cwd, stdio: ['pipe', 'pipe', 'pipe'] });
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

interface Shown {
  position: { line: number; character: number };
  text: string;
}

/**
 * Reports what became of each suggestion, once: accepted (the item's command ran) or rejected (the
 * next request came while the suggestion was shown, and the text typed since does not follow it).
 */
export class Outcomes {
  private shown = new Map<string, Shown>();

  constructor(private send: (method: string, params: object) => void) {}

  /** A new request; `typed` is the text from the shown suggestion's position to the cursor, undefined if the cursor left it. */
  requested(uri: string, typed: (from: Shown['position']) => string | undefined): void {
    const s = this.shown.get(uri);
    if (!s) {
      return;
    }
    this.shown.delete(uri);
    const t = typed(s.position);
    if (t === undefined || !s.text.startsWith(t)) {
      this.send(DID_REJECT, { uri, position: s.position, text: s.text });
    }
  }

  offered(uri: string, position: Shown['position'], text: string): void {
    this.shown.set(uri, { position, text });
  }

  accepted(uri: string, position: Shown['position'], text: string): void {
    this.shown.delete(uri);
    this.send(DID_ACCEPT, { uri, position, text });
  }
}
