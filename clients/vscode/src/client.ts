// One connection to the mlxd daemon (docs/PROTOCOL.md): frames of a 4-byte big-endian
// length and one MessagePack map, `hello` first, then many requests at once, routed by id.
// No VS Code API here, so node alone can test it against a real daemon.
//
// Threading: node's single event loop; a Client is used from it only.

import * as fs from "node:fs";
import * as net from "node:net";
import * as os from "node:os";
import * as path from "node:path";
import { decode, encode } from "@msgpack/msgpack";

export const PROTOCOL_VERSION = 1;

/** A message from the daemon: `type` names it; the rest depends on it. */
export type Message = { type: string; id?: number; [key: string]: unknown };

export interface Handlers {
  /** Chunks, queued and progress messages of the request (and any newer type). */
  onMessage?: (message: Message) => void;
  /** Its done or error: exactly once. */
  onEnd?: (message: Message) => void;
}

/** $MLXD_SOCKET, else the platform's path (protocol/paths.py). */
export function defaultSocketPath(): string {
  const env = process.env.MLXD_SOCKET;
  if (env) return env;
  if (process.platform === "darwin") {
    return path.join(os.homedir(), "Library", "Application Support", "mlxd", "mlxd.sock");
  }
  const runtime = process.env.XDG_RUNTIME_DIR;
  if (runtime) return path.join(runtime, "mlxd", "mlxd.sock");
  return `/tmp/mlxd-${process.getuid?.() ?? 0}/mlxd.sock`;
}

export function frame(message: object): Buffer {
  const payload = encode(message, { ignoreUndefined: true });
  const out = Buffer.allocUnsafe(4 + payload.length);
  out.writeUInt32BE(payload.length, 0);
  out.set(payload, 4);
  return out;
}

export class Client {
  state: "down" | "connecting" | "ready" = "down";
  welcome: Message | undefined;
  lastError: string | undefined;
  /** Why the last connection ended, for the requests made while down. */
  private downCode: string | undefined;
  private nextId = 1;
  private pending = new Map<number, Handlers>();
  private outbox: Buffer[] = [];
  private inbuf: Buffer = Buffer.alloc(0);
  private socket: net.Socket | undefined;
  private lastAttempt = -Infinity;

  /**
   * @param socketPath where the daemon listens
   * @param reconnectMs the least time between two attempts to reach a missing daemon
   * @param onState told when the connection becomes "ready" or "down"
   */
  constructor(
    readonly socketPath: string = defaultSocketPath(),
    readonly reconnectMs = 1000,
    private readonly onState: (state: "ready" | "down", detail?: string) => void = () => {},
  ) {}

  /** Connect unless connected, connecting, or an attempt failed less than reconnectMs ago. */
  connect(): void {
    if (this.state !== "down" || Date.now() - this.lastAttempt < this.reconnectMs) return;
    this.lastAttempt = Date.now();
    this.state = "connecting";
    this.inbuf = Buffer.alloc(0);
    // Whoever owns the socket runs the server behind it: a socket another user made (in a
    // folder they could write to) would get our code. Checked before connecting.
    const uid = process.getuid?.();
    let owner: number | undefined;
    try {
      owner = fs.statSync(this.socketPath).uid;
    } catch {
      owner = undefined; // missing: the connect says so
    }
    if (uid !== undefined && owner !== undefined && owner !== uid) {
      const why = `${this.socketPath} belongs to uid ${owner}, not to you (uid ${uid})`;
      this.drop(`${why}: it is not your mlxd, so nothing was sent to it`, false, "permission_denied");
      return;
    }
    const socket = net.createConnection(this.socketPath);
    this.socket = socket;
    socket.on("connect", () => {
      socket.write(frame({ type: "hello", protocol: PROTOCOL_VERSION, client: "mlxd-vscode" }));
    });
    socket.on("data", (data: Buffer) => {
      if (this.socket === socket) this.receive(data);
    });
    const lost = (why: string) => {
      if (this.socket === socket) this.drop(why);
    };
    socket.on("error", (err) => lost(`no mlxd at ${this.socketPath} (${err.message})`));
    socket.on("close", () => lost("the daemon closed the connection"));
  }

  /** Close; every request in flight ends with an error. */
  close(): void {
    this.drop("closed by the editor", true);
  }

  /** Every request in flight ends with an error: `code` if given, else `daemon_unavailable`
   * if the handshake never finished, else `connection_closed`. */
  private drop(reason: string, quiet = false, code?: string): void {
    code ??= this.state === "ready" ? "connection_closed" : "daemon_unavailable";
    this.downCode = code;
    const socket = this.socket;
    this.socket = undefined;
    this.welcome = undefined;
    this.outbox = [];
    socket?.destroy();
    const pending = this.pending;
    this.pending = new Map();
    const was = this.state;
    this.state = "down";
    this.lastError = reason;
    if (!quiet && was !== "down") this.onState("down", reason);
    for (const [id, handlers] of pending) {
      handlers.onEnd?.({ type: "error", id, code, message: reason });
    }
  }

  private receive(data: Buffer): void {
    this.inbuf = this.inbuf.length ? Buffer.concat([this.inbuf, data]) : data;
    let pos = 0;
    while (this.inbuf.length - pos >= 4) {
      const length = this.inbuf.readUInt32BE(pos);
      if (this.inbuf.length - pos < 4 + length) break;
      let message: Message;
      try {
        message = decode(this.inbuf.subarray(pos + 4, pos + 4 + length)) as Message;
      } catch {
        this.drop("undecodable frame from the daemon");
        return;
      }
      pos += 4 + length;
      this.dispatch(message);
      if (this.socket === undefined) return;
    }
    this.inbuf = this.inbuf.subarray(pos);
  }

  private dispatch(message: Message): void {
    if (this.state === "connecting") {
      if (message.type !== "welcome") {
        this.drop(`handshake refused: ${message.code}: ${message.message}`);
        return;
      }
      this.welcome = message;
      this.state = "ready";
      this.onState("ready");
      for (const f of this.outbox) this.socket?.write(f);
      this.outbox = [];
      return;
    }
    const handlers = message.id === undefined ? undefined : this.pending.get(message.id);
    if (handlers === undefined) return; // no id, or a request no one waits for
    if (message.type === "done" || message.type === "error") {
      this.pending.delete(message.id!);
      handlers.onEnd?.(message);
    } else {
      handlers.onMessage?.(message);
    }
  }

  /**
   * Send `message` (its `id` is assigned here) and return the id. Without a daemon it ends
   * at once with the error `daemon_unavailable` (`permission_denied` if the socket belongs to
   * another user), unless a connection attempt is under way.
   */
  request(message: Record<string, unknown>, handlers: Handlers = {}): number {
    const id = this.nextId++;
    this.connect();
    if (this.state === "down") {
      handlers.onEnd?.({
        type: "error",
        id,
        code: this.downCode === "permission_denied" ? this.downCode : "daemon_unavailable",
        message: this.lastError ?? `no mlxd at ${this.socketPath}`,
      });
      return id;
    }
    this.pending.set(id, handlers);
    const f = frame({ ...message, id });
    if (this.state === "ready") this.socket!.write(f);
    else this.outbox.push(f);
    return id;
  }

  /** The request's end (done or error), after its chunks went to `onMessage`. */
  call(message: Record<string, unknown>, onMessage?: (m: Message) => void): Promise<Message> {
    return new Promise((resolve) => this.request(message, { onMessage, onEnd: resolve }));
  }

  inFlight(id: number | undefined): boolean {
    return id !== undefined && this.pending.has(id);
  }

  /** Cancel request `id`; it ends with finish_reason "cancelled". */
  cancel(id: number): void {
    if (this.pending.has(id)) this.request({ type: "cancel", target: id });
  }
}
