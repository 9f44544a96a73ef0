// The VS Code side: registers the inline completion provider and two commands, and reads
// the `mlxd.*` settings. Everything that talks to the daemon is in client.ts and
// provider.ts. Threading: the extension host's event loop.

import * as vscode from "vscode";
import { Client, defaultSocketPath } from "./client";
import { InlineProvider, Settings, defaultSettings } from "./provider";

function settings(): Settings {
  const c = vscode.workspace.getConfiguration("mlxd");
  return {
    ...defaultSettings,
    model: c.get<string>("model") || undefined,
    maxTokens: c.get<number>("maxTokens", defaultSettings.maxTokens),
    debounceMs: c.get<number>("debounceMs", defaultSettings.debounceMs),
    fim: c.get<boolean>("fim", defaultSettings.fim),
  };
}

export function activate(context: vscode.ExtensionContext): void {
  const socket = vscode.workspace.getConfiguration("mlxd").get<string>("socket") || defaultSocketPath();
  // One message when the daemon goes missing, one when it is back: never one per keystroke.
  let warned = false;
  const client = new Client(socket, 1000, (state, detail) => {
    if (state === "down" && !warned) {
      warned = true;
      vscode.window.setStatusBarMessage(`mlxd: ${detail}; completions resume when it runs`, 10000);
    } else if (state === "ready" && warned) {
      warned = false;
      vscode.window.setStatusBarMessage("mlxd: connected", 5000);
    }
  });
  const provider = new InlineProvider(client, settings());

  context.subscriptions.push(
    vscode.workspace.onDidChangeConfiguration((e) => {
      if (e.affectsConfiguration("mlxd")) provider.settings = settings();
    }),
    vscode.languages.registerInlineCompletionItemProvider(
      { pattern: "**" },
      {
        async provideInlineCompletionItems(document, position, _context, token) {
          const s = await provider.complete(document, document.offsetAt(position), token);
          if (!s || s.text === "") return undefined;
          return [new vscode.InlineCompletionItem(s.text, new vscode.Range(position, position))];
        },
      },
    ),
    vscode.commands.registerCommand("mlxd.status", async () => {
      const st = provider.stats;
      const counts = `${st.requests} requests: ${st.completed} completed, ${st.cancelled} cancelled, ${st.failed} failed`;
      const stats = await client.call({ type: "stats" });
      const daemon =
        stats.type === "done"
          ? `${client.welcome?.server}, up ${Math.round((stats.stats as { uptime_s: number }).uptime_s)} s`
          : `${stats.code}: ${stats.message}`;
      vscode.window.showInformationMessage(`mlxd (${client.socketPath}): ${daemon}; ${counts}`);
    }),
    vscode.commands.registerCommand("mlxd.models", async () => {
      const done = await client.call({ type: "models" });
      const models = (done.models as { name: string; resident: boolean }[] | undefined) ?? [];
      vscode.window.showInformationMessage(
        done.type === "done"
          ? `mlxd models: ${models.map((m) => m.name + (m.resident ? " (resident)" : "")).join(", ")}`
          : `mlxd: ${done.code}: ${done.message}`,
      );
    }),
    { dispose: () => client.close() },
  );
}

export function deactivate(): void {}
