// Ghostline for VS Code: a language client for `ghostline serve`. Suggestions arrive as LSP 3.18
// inline completions, which vscode-languageclient 11 turns into VS Code ghost text.
import * as vscode from 'vscode';
import {
  DidChangeConfigurationNotification,
  LanguageClient,
  LanguageClientOptions,
  ServerOptions,
} from 'vscode-languageclient/node';
import { connectServer, launch, Outcomes, serverSettings, spawnServer, Status, STATUS } from './server';

const LANGUAGES = ['python', 'lua', 'javascript', 'typescript', 'go', 'rust', 'c', 'cpp', 'java'];
const ACCEPTED = 'ghostline.accepted';

let client: LanguageClient | undefined;
let statusItem: vscode.StatusBarItem;
const outcomes = new Outcomes((method, params) => void client?.sendNotification(method, params));

function config<T>(key: string, fallback: T): T {
  return vscode.workspace.getConfiguration('ghostline').get<T>(key, fallback);
}

function showStatus(s: Status): void {
  const icon = { loading: '$(loading~spin)', ready: '$(sparkle)', busy: '$(sync~spin)', error: '$(error)' }[s.state] ?? '$(question)';
  statusItem.text = `${icon} Ghostline`;
  statusItem.tooltip = `Ghostline: ${s.state}${s.message ? ` — ${s.message}` : ''}\nmodel: ${s.model}`;
  statusItem.backgroundColor = s.state === 'error' ? new vscode.ThemeColor('statusBarItem.errorBackground') : undefined;
  statusItem.show();
}

async function start(): Promise<void> {
  const l = launch(config);
  const serverOptions: ServerOptions = l.serverAddress
    ? async () => {
        const socket = await connectServer(l.serverAddress);
        return { reader: socket, writer: socket };
      }
    : async () => spawnServer(l, process.env, vscode.workspace.workspaceFolders?.[0]?.uri.fsPath);

  const clientOptions: LanguageClientOptions = {
    documentSelector: LANGUAGES.map((language) => ({ language })),
    initializationOptions: serverSettings(config),
    middleware: {
      // Each item carries a command that VS Code runs once it is accepted; a new request while one
      // is shown, with typing that went elsewhere, means it was rejected.
      provideInlineCompletionItems: async (document, position, context, token, next) => {
        const uri = document.uri.toString();
        outcomes.requested(uri, (from) => {
          const start = new vscode.Position(from.line, from.character);
          return start.line === position.line && start.isBeforeOrEqual(position)
            ? document.getText(new vscode.Range(start, position))
            : undefined;
        });
        const result = await next(document, position, context, token);
        const items = Array.isArray(result) ? result : result?.items ?? [];
        const at = { line: position.line, character: position.character };
        for (const item of items) {
          const text = typeof item.insertText === 'string' ? item.insertText : item.insertText.value;
          item.command ??= { title: 'Ghostline: accepted', command: ACCEPTED, arguments: [uri, at, text] };
        }
        const first = items[0];
        if (first) {
          outcomes.offered(uri, at, typeof first.insertText === 'string' ? first.insertText : first.insertText.value);
        }
        return result;
      },
    },
  };

  client = new LanguageClient('ghostline', 'Ghostline', serverOptions, clientOptions);
  client.onNotification(STATUS, (s: Status) => showStatus(s));
  showStatus({ state: 'loading', message: 'starting the server', model: config<string | null>('model', null) ?? 'default' });
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

export async function activate(context: vscode.ExtensionContext): Promise<void> {
  statusItem = vscode.window.createStatusBarItem(vscode.StatusBarAlignment.Right, 100);
  statusItem.command = 'ghostline.showOutput';
  context.subscriptions.push(
    statusItem,
    vscode.commands.registerCommand('ghostline.restart', restart),
    vscode.commands.registerCommand(ACCEPTED, (uri: string, at: { line: number; character: number }, text: string) =>
      outcomes.accepted(uri, at, text),
    ),
    vscode.commands.registerCommand('ghostline.showOutput', () => client?.outputChannel.show()),
    vscode.workspace.onDidChangeConfiguration((e) => {
      if (['serverPath', 'serverArgs', 'serverAddress'].some((k) => e.affectsConfiguration(`ghostline.${k}`))) {
        void restart();
      } else if (e.affectsConfiguration('ghostline') && client) {
        void client.sendNotification(DidChangeConfigurationNotification.type, {
          settings: { ghostline: serverSettings(config) },
        });
      }
    }),
  );
  await start();
}

export async function deactivate(): Promise<void> {
  await client?.dispose();
}
