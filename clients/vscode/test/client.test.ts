// node --test, against a real daemon: $MLXD_SOCKET is its socket and $MLXD_VSCODE_EXPECT
// holds mlx-lm's greedy outputs for the prompts below. Run them with
// `.venv/bin/python -m pytest tests/test_vscode.py` from the repository root: it starts the
// daemon, computes the outputs and sets both.

import { strict as assert } from "node:assert";
import * as fs from "node:fs";
import * as net from "node:net";
import { after, test } from "node:test";
import { Client, Message } from "../src/client";
import { InlineProvider, Token, defaultSettings, prefixStart } from "../src/provider";

function required(name: string): string {
  const value = process.env[name];
  if (!value) {
    // Fail at once: without it every daemon test would fail on its own, or wait on a daemon.
    throw new Error(
      `${name} is not set: these tests need a daemon ($MLXD_SOCKET) and mlx-lm's outputs for ` +
        "their prompts ($MLXD_VSCODE_EXPECT). Run them with " +
        "`.venv/bin/python -m pytest tests/test_vscode.py` from the repository root.",
    );
  }
  return value;
}

const socket = required("MLXD_SOCKET");
const expect = JSON.parse(required("MLXD_VSCODE_EXPECT"));

// Every client a test opens is closed at the end, also when the test failed half-way: an
// open connection (or a request still streaming) would keep node running.
const clients: Client[] = [];
function newClient(...args: ConstructorParameters<typeof Client>): Client {
  const client = new Client(...args);
  clients.push(client);
  return client;
}
after(() => {
  for (const client of clients) client.close();
});

function token(): Token & { cancel(): void } {
  const listeners: (() => void)[] = [];
  return {
    isCancellationRequested: false,
    onCancellationRequested(listener) {
      listeners.push(listener);
      return { dispose: () => listeners.splice(listeners.indexOf(listener), 1) };
    },
    cancel() {
      this.isCancellationRequested = true;
      for (const l of [...listeners]) l();
    },
  };
}

test("hello, then a streamed generate equal to mlx-lm's greedy output", async () => {
  const client = newClient(socket);
  const chunks: Message[] = [];
  const done = await client.call(
    { type: "generate", prompt: expect.plain.prompt, max_tokens: expect.plain.max_tokens },
    (m) => chunks.push(m),
  );
  assert.equal(client.welcome?.protocol, 1);
  assert.equal(done.type, "done");
  assert.equal(done.finish_reason, "length");
  assert.ok(chunks.length > 1, "streamed in several chunks");
  assert.equal(chunks.map((c) => c.text).join(""), expect.plain.text);
  client.close();
});

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

test("supersedes cancels the previous request on the daemon", async () => {
  const client = newClient(socket);
  let firstChunk!: () => void;
  const started = new Promise<void>((resolve) => (firstChunk = resolve));
  let firstId!: number;
  const first = new Promise<Message>((resolve) => {
    firstId = client.request(
      { type: "generate", prompt: "a long one", max_tokens: 4000 },
      { onMessage: () => firstChunk(), onEnd: resolve },
    );
  });
  await started; // it is decoding now
  const second = await client.call({
    type: "generate",
    prompt: "x",
    max_tokens: 4,
    supersedes: firstId,
  });
  assert.equal((await first).finish_reason, "cancelled");
  assert.equal(second.finish_reason, "length");
  client.close();
});

test("the inline provider fills in the middle; the next call supersedes its last", async () => {
  const client = newClient(socket);
  const settings = { ...defaultSettings, stop: [], debounceMs: 5 };
  const provider = new InlineProvider(client, { ...settings, maxTokens: 4000 });
  // One keystroke's call, still streaming when the next keystroke's comes.
  const first = provider.complete({ getText: () => "a long one" }, 10, token());
  await sleep(200);
  provider.settings = { ...settings, maxTokens: expect.fim.max_tokens };
  const { prefix, suffix } = expect.fim;
  const suggestion = await provider.complete(
    { getText: () => prefix + suffix },
    prefix.length,
    token(),
  );
  assert.equal(await first, undefined);
  assert.deepEqual(provider.stats, { requests: 2, completed: 1, cancelled: 1, failed: 0 });
  assert.ok(suggestion);
  assert.equal(suggestion.done.fim, "tokens");
  assert.equal(suggestion.text, expect.fim.text);

  // VS Code cancelling the call's token cancels its request.
  provider.settings = { ...settings, maxTokens: 4000 };
  const t = token();
  const third = provider.complete({ getText: () => "a long one" }, 10, t);
  await sleep(200);
  t.cancel();
  assert.equal(await third, undefined);
  assert.equal(provider.stats.cancelled, 2);
  client.close();
});

test("no daemon: requests fail at once, and the state changes only once", async () => {
  const states: string[] = [];
  const client = newClient(socket + ".missing", 60_000, (s) => states.push(s));
  const ends = await Promise.all([1, 2, 3].map(() => client.call({ type: "ping" })));
  const again = await client.call({ type: "ping" });
  for (const end of [...ends, again]) assert.equal(end.type, "error");
  assert.equal(again.code, "daemon_unavailable");
  assert.deepEqual(states, ["down"]);
});

test(
  "a socket another user owns: refused before connecting, not a byte sent",
  { skip: process.getuid?.() !== 0 && "needs root to make a socket another user owns" },
  async () => {
    const dir = fs.mkdtempSync("/tmp/mlxd-vsc-");
    const path = `${dir}/mlxd.sock`;
    let connections = 0;
    const server = net.createServer(() => connections++);
    await new Promise<void>((resolve) => server.listen(path, resolve));
    fs.chownSync(path, 65534, 65534); // as if nobody had put it there
    try {
      const client = newClient(path);
      const end = await client.call({ type: "ping" });
      assert.equal(end.code, "permission_denied");
      assert.match(String(end.message), /uid 65534/);
      await sleep(200); // a connect, had there been one, would have been accepted by now
      assert.equal(connections, 0);
    } finally {
      await new Promise((resolve) => server.close(resolve));
      fs.rmSync(dir, { recursive: true, force: true });
    }
  },
);

test("the prompt's start moves in steps, not with each keystroke", () => {
  const text = "line\n".repeat(1000);
  const starts = new Set<number>();
  for (let offset = 3000; offset < 3100; offset++) starts.add(prefixStart(text, offset, 1000));
  assert.equal(starts.size, 1);
  const [start] = starts;
  assert.equal(text[start - 1], "\n");
  assert.ok(3000 - start <= 1250 && 3100 - start >= 1000);
  assert.equal(prefixStart(text, 500, 1000), 0);
});
