// Ghostline for VS Code: a language client for `ghostline serve`. Suggestions arrive as LSP 3.18
// inline completions, which vscode-languageclient 11 turns into VS Code ghost text.
import * as vscode from 'vscode';
import {
  DidChangeConfigurationNotification,
  LanguageClient,
  LanguageClientOptions,
  ServerOptions,
} from 'vscode-languageclient/node';
import {
  connectServer,
  launch,
  Outcomes,
  RESTART_SETTINGS,
  serverSettings,
  spawnServer,
  Status,
  STATUS,
  StderrLog,
  TextFrom,
} from './server';

const LANGUAGES = ['python', 'lua', 'javascript', 'typescript', 'go', 'rust', 'c', 'cpp', 'java'];
const ACCEPTED = 'ghostline.accepted';
const LOADED_ONCE = 'ghostline.loadedOnce';

let client: LanguageClient | undefined;
let context: vscode.ExtensionContext;
let output: vscode.LogOutputChannel;
let statusItem: vscode.StatusBarItem;
let status: Status = { state: 'loading', message: 'starting the server', model: '' };
const statusListeners = new Set<(s: Status) => void>();
const outcomes = new Outcomes((method, params) => void client?.sendNotification(method, params));

function config<T>(key: string, fallback: T): T {
  return vscode.workspace.getConfiguration('ghostline').get<T>(key, fallback);
}

/** Suggestions on for this language (`ghostline.enable`, which a language can override). */
function enabledFor(languageId: string | undefined): boolean {
  return vscode.workspace.getConfiguration('ghostline', languageId ? { languageId } : undefined).get('enable', true);
}

function showStatus(s: Status): void {
  status = s;
  const language = vscode.window.activeTextEditor?.document.languageId;
  const off = !enabledFor(language);
  const icon = off
    ? '$(circle-slash)'
    : { loading: '$(loading~spin)', ready: '$(sparkle)', busy: '$(sync~spin)', error: '$(error)' }[s.state] ?? '$(question)';
  statusItem.text = `${icon} Ghostline`;
  const detail = s.message ? ` — ${s.message}` : '';
  const model = s.model ? `\nmodel: ${s.model}` : '';
  statusItem.tooltip = `Ghostline: ${off ? `off for ${language}` : s.state}${detail}${model}\nClick for the server log`;
  statusItem.accessibilityInformation = { label: `Ghostline ${off ? 'off' : s.state}${detail}` };
  statusItem.backgroundColor = s.state === 'error' ? new vscode.ThemeColor('statusBarItem.errorBackground') : undefined;
  statusItem.show();
  statusListeners.forEach((listener) => listener(s));
}

/** The first time a model loads, a notification with its progress (later starts show the status bar only). */
function firstStartNotice(): void {
  if (context.globalState.get(LOADED_ONCE)) {
    return;
  }
  void vscode.window.withProgress(
    { location: vscode.ProgressLocation.Notification, title: 'Ghostline (first start)' },
    (progress) =>
      new Promise<void>((resolve) => {
        const listener = (s: Status): void => {
          if (s.state === 'loading') {
            progress.report({ message: s.message || 'loading the model' });
            return;
          }
          statusListeners.delete(listener);
          if (s.state !== 'error') {
            void context.globalState.update(LOADED_ONCE, true);
          }
          resolve();
        };
        statusListeners.add(listener);
        listener(status);
      }),
  );
}

/** The text from `from` to `to` in `document`, undefined where `from` is past `to`. */
function textBetween(document: vscode.TextDocument, to: vscode.Position): TextFrom {
  return (from) => {
    const start = new vscode.Position(from.line, from.character);
    return start.isBeforeOrEqual(to) ? document.getText(new vscode.Range(start, to)) : undefined;
  };
}

function insertText(item: vscode.InlineCompletionItem): string {
  return typeof item.insertText === 'string' ? item.insertText : item.insertText.value;
}

/** Each item carries a command that VS Code runs once it is accepted; the request itself tells what became of the last one. */
const provideInlineCompletionItems: NonNullable<LanguageClientOptions['middleware']>['provideInlineCompletionItems'] = async (
  document,
  position,
  context,
  token,
  next,
) => {
  if (!enabledFor(document.languageId)) {
    return [];
  }
  const uri = document.uri.toString();
  outcomes.requested(uri, textBetween(document, position));
  const result = await next(document, position, context, token);
  const items = Array.isArray(result) ? result : result?.items ?? [];
  for (const item of items) {
    const at = item.range?.start ?? position;
    item.command ??= {
      title: 'Ghostline: accepted',
      command: ACCEPTED,
      arguments: [uri, { line: at.line, character: at.character }, insertText(item)],
    };
  }
  if (items[0]) {
    outcomes.offered(uri, { line: position.line, character: position.character }, insertText(items[0]));
  }
  return result;
};

function serverOptions(): ServerOptions {
  const l = launch(config);
  if (l.serverAddress) {
    return async () => {
      const socket = await connectServer(l.serverAddress);
      return { reader: socket, writer: socket };
    };
  }
  return async () => spawnServer(l, process.env, vscode.workspace.workspaceFolders?.[0]?.uri.fsPath);
}

/** The server's stderr in the output channel at each line's level, without what `window/logMessage` already shows. */
function stderrToOutput(input: NodeJS.ReadableStream, channel: vscode.LogOutputChannel): void {
  const sorter = new StderrLog(() => client?.initializeResult !== undefined);
  let rest = '';
  input.on('data', (chunk: Buffer | string) => {
    const lines = (rest + chunk.toString()).split(/\r?\n/);
    rest = lines.pop() ?? '';
    for (const line of lines) {
      const level = line ? sorter.level(line) : undefined;
      if (level) {
        channel[level](line);
      }
    }
  });
}

async function start(): Promise<void> {
  const clientOptions: LanguageClientOptions = {
    documentSelector: LANGUAGES.map((language) => ({ language })),
    initializationOptions: serverSettings(config),
    outputChannel: output,
    stdioOptions: { stdout: () => undefined, stderr: stderrToOutput },
    middleware: { provideInlineCompletionItems },
  };
  client = new LanguageClient('ghostline', 'Ghostline', serverOptions(), clientOptions);
  client.onNotification(STATUS, (s: Status) => showStatus(s));
  showStatus({ state: 'loading', message: 'starting the server', model: config<string | null>('model', null) ?? '' });
  firstStartNotice();
  try {
    await client.start();
  } catch (err) {
    showStatus({ state: 'error', message: `could not start the server: ${err}`, model: '' });
  }
}

async function restart(): Promise<void> {
  const old = client;
  client = undefined;
  await old?.dispose();
  await start();
}

/** Suggestions on or off: everywhere, or (`language`) for the active editor's language only. */
async function toggle(language: boolean): Promise<void> {
  const languageId = vscode.window.activeTextEditor?.document.languageId;
  if (language && !languageId) {
    void vscode.window.showInformationMessage('Ghostline: open a file to turn suggestions on or off for its language.');
    return;
  }
  const scope = language && languageId ? { languageId } : undefined;
  const section = vscode.workspace.getConfiguration('ghostline', scope);
  await section.update('enable', !enabledFor(scope?.languageId), vscode.ConfigurationTarget.Global, language);
  showStatus(status);
}

function onConfigurationChange(e: vscode.ConfigurationChangeEvent): void {
  if (RESTART_SETTINGS.some((k) => e.affectsConfiguration(`ghostline.${k}`))) {
    void restart();
  } else if (e.affectsConfiguration('ghostline') && client) {
    void client.sendNotification(DidChangeConfigurationNotification.type, { settings: { ghostline: serverSettings(config) } });
  }
  if (e.affectsConfiguration('ghostline.enable')) {
    showStatus(status);
  }
}

/** Multi-character insertions that continue the shown suggestion are partial accepts (accept word, accept line). */
function onDocumentChange(e: vscode.TextDocumentChangeEvent): void {
  const uri = e.document.uri.toString();
  for (const change of e.contentChanges) {
    if (change.range.isEmpty && change.text.length > 1) {
      const at = change.range.start;
      outcomes.inserted(uri, { line: at.line, character: at.character }, change.text, textBetween(e.document, at));
    }
  }
}

export async function activate(ctx: vscode.ExtensionContext): Promise<void> {
  context = ctx;
  output = vscode.window.createOutputChannel('Ghostline', { log: true });
  statusItem = vscode.window.createStatusBarItem('ghostline.status', vscode.StatusBarAlignment.Right, 100);
  statusItem.name = 'Ghostline';
  statusItem.command = 'ghostline.showOutput';
  ctx.subscriptions.push(
    output,
    statusItem,
    vscode.commands.registerCommand('ghostline.restart', restart),
    vscode.commands.registerCommand('ghostline.toggle', () => toggle(false)),
    vscode.commands.registerCommand('ghostline.toggleLanguage', () => toggle(true)),
    vscode.commands.registerCommand(ACCEPTED, (uri: string, at: { line: number; character: number }, text: string) =>
      outcomes.accepted(uri, at, text),
    ),
    vscode.commands.registerCommand('ghostline.showOutput', () => output.show(true)),
    vscode.workspace.onDidChangeConfiguration(onConfigurationChange),
    vscode.workspace.onDidChangeTextDocument(onDocumentChange),
    vscode.window.onDidChangeActiveTextEditor(() => showStatus(status)),
  );
  await start();
}

export async function deactivate(): Promise<void> {
  await client?.dispose();
}
