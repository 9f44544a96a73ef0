// The inline completion logic, on structural types only (a document's text and offsets, a
// cancellation token), so node can test it without VS Code; extension.ts adapts it.
//
// Each call waits out a short debounce, then sends one `generate` for the text around the
// cursor (the text after it as `suffix`: fill in the middle), naming the previous call's
// request in `supersedes` so the daemon cancels it first. A cancelled token cancels the
// request. Threading: node's event loop.

import { Client, Message } from "./client";

export interface Settings {
  model?: string;
  maxTokens: number;
  debounceMs: number;
  fim: boolean;
  stop: string[];
  /** The most characters of text sent before and after the cursor. */
  maxPrefixChars: number;
  maxSuffixChars: number;
}

export const defaultSettings: Settings = {
  maxTokens: 64,
  debounceMs: 30,
  fim: true,
  stop: ["\n\n"],
  maxPrefixChars: 8000,
  maxSuffixChars: 2000,
};

/** What the provider needs of a vscode.TextDocument and a vscode.CancellationToken. */
export interface Doc {
  getText(): string;
}
export interface Token {
  isCancellationRequested: boolean;
  onCancellationRequested(listener: () => void): { dispose(): void };
}

export interface Suggestion {
  text: string;
  /** The request's done. */
  done: Message;
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

export class InlineProvider {
  private last: number | undefined;
  stats = { requests: 0, completed: 0, cancelled: 0, failed: 0 };

  constructor(
    readonly client: Client,
    public settings: Settings = defaultSettings,
  ) {}

  /** The completion at `offset` (in UTF-16 code units, as VS Code counts), or undefined. */
  async complete(doc: Doc, offset: number, token: Token): Promise<Suggestion | undefined> {
    const s = this.settings;
    if (s.debounceMs > 0) await sleep(s.debounceMs);
    if (token.isCancellationRequested) return undefined;
    const text = doc.getText();
    const prefix = text.slice(prefixStart(text, offset, s.maxPrefixChars), offset);
    const suffix = headOf(text.slice(offset), s.maxSuffixChars);
    const message: Record<string, unknown> = {
      type: "generate",
      prompt: prefix,
      max_tokens: s.maxTokens,
      model: s.model || undefined,
      stop: s.stop.length ? s.stop : undefined,
      suffix: s.fim && suffix !== "" ? suffix : undefined,
      supersedes: this.client.inFlight(this.last) ? this.last : undefined,
    };
    const parts: string[] = [];
    let id: number | undefined;
    const done = new Promise<Message>((resolve) => {
      id = this.client.request(message, {
        onMessage: (m) => {
          if (m.type === "chunk") parts.push(m.text as string);
        },
        onEnd: resolve,
      });
    });
    this.last = id;
    this.stats.requests++;
    const listener = token.onCancellationRequested(() => this.client.cancel(id!));
    const end = await done;
    listener.dispose();
    if (end.type === "error") {
      this.stats.failed++;
      return undefined;
    }
    if (end.finish_reason === "cancelled") {
      this.stats.cancelled++;
      return undefined;
    }
    this.stats.completed++;
    return { text: parts.join(""), done: end };
  }
}

/** Where the prompt starts: the file's start, or the start of a line after a point that
 * moves in steps of a quarter of `max` (not with every keystroke), so that successive
 * prompts share their start and the daemon's prompt cache serves it. */
export function prefixStart(text: string, offset: number, max: number): number {
  if (offset <= max) return 0;
  const step = Math.max(1, Math.floor(max / 4));
  const from = Math.floor((offset - max) / step) * step;
  const nl = text.indexOf("\n", from);
  if (nl >= 0 && nl < offset) return nl + 1;
  // One huge line: cut inside it, but never between the halves of a surrogate pair.
  return /[\uDC00-\uDFFF]/.test(text[from] ?? "") ? from + 1 : from;
}

/** At most `max` characters from the start of `text`, cut at a line end when it has one,
 * never between the halves of a surrogate pair (MessagePack strings are UTF-8). */
function headOf(text: string, max: number): string {
  if (text.length <= max) return text;
  const part = text.slice(0, max);
  const nl = part.lastIndexOf("\n");
  return nl >= 0 ? part.slice(0, nl) : part.replace(/[\uD800-\uDBFF]$/, "");
}
