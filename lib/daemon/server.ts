/**
 * The control socket: a Unix stream socket (mode 0600) that carries the
 * line protocol of protocol.ts. A bad request gets an error reply and the
 * connection stays usable; nothing a client sends can crash the daemon.
 */
import { type Daemon, log } from "./daemon.ts";
import {
  type ArgsOf,
  type Envelope,
  errorBody,
  MAX_LINE_BYTES,
  type Op,
  parseRequest,
  PROTOCOL_VERSION,
  type Reply,
  salvageId,
} from "./protocol.ts";
import { BlksnapError, ERRNO, ErrnoError } from "../../ffi/errno.ts";

/** What the server needs of the daemon (a fake in the unit tests). */
export type DaemonApi = Pick<
  Daemon,
  | "version"
  | "status"
  | "attach"
  | "detach"
  | "recover"
  | "prepareHandover"
  | "detachForce"
  | "cbtInfo"
  | "readCbtMap"
  | "markDirty"
  | "snapshotInfo"
  | "snapshotCreate"
  | "snapshotAdd"
  | "snapshotTake"
  | "snapshotDestroy"
  | "snapshotCollect"
  | "snapshotWaitEvent"
>;

/** Connections served at once; more are closed at accept. */
const MAX_CONNECTIONS = 256;

export class ControlServer {
  readonly #daemon: DaemonApi;
  readonly #listener: Deno.UnixListener;
  readonly #path: string;
  readonly #conns = new Set<Deno.UnixConn>();
  #closed = false;
  /** Resolves when a client asked the daemon to shut down. */
  readonly shutdownRequested: Promise<void>;
  #requestShutdown!: () => void;
  /** Resolves once the reply to an accepted handover has been written. */
  readonly handoverRequested: Promise<void>;
  #requestHandover!: () => void;
  #handoverAccepted = false;

  private constructor(daemon: DaemonApi, listener: Deno.UnixListener, path: string) {
    this.#daemon = daemon;
    this.#listener = listener;
    this.#path = path;
    this.shutdownRequested = new Promise((r) => (this.#requestShutdown = r));
    this.handoverRequested = new Promise((r) => (this.#requestHandover = r));
  }

  /** A handover started by a signal: no reply to wait for. */
  handoverAfterSignal(): void {
    this.#requestHandover();
  }

  /** Binds the socket; refuses when another daemon answers on it. */
  static async listen(daemon: DaemonApi, path: string): Promise<ControlServer> {
    const dir = path.slice(0, path.lastIndexOf("/")) || "/";
    Deno.mkdirSync(dir, { recursive: true, mode: 0o755 });
    if (await isAlive(path)) {
      throw new ErrnoError(
        `bind("${path}")`,
        ERRNO.EADDRINUSE,
        "another blksnap daemon is running",
      );
    }
    try {
      Deno.removeSync(path);
    } catch {
      // no stale socket
    }
    const listener = Deno.listen({ transport: "unix", path });
    Deno.chmodSync(path, 0o600);
    return new ControlServer(daemon, listener, path);
  }

  /**
   * Accepts until close(). An accept that fails (out of file descriptors, a
   * connection reset before it was accepted) is logged and retried after a
   * pause: it never takes the daemon, and its devices, down.
   */
  async serve(): Promise<void> {
    while (!this.#closed) {
      let conn: Deno.UnixConn;
      try {
        conn = await this.#listener.accept();
      } catch (err) {
        if (this.#closed) return;
        log(`accept failed: ${err instanceof Error ? err.message : err}; retrying`);
        await new Promise((r) => setTimeout(r, 200));
        continue;
      }
      if (this.#conns.size >= MAX_CONNECTIONS) {
        log(`refusing a connection: ${MAX_CONNECTIONS} are open`);
        conn.close();
        continue;
      }
      this.#conns.add(conn);
      this.#serveConn(conn).finally(() => this.#conns.delete(conn));
    }
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#listener.close();
    for (const c of this.#conns) {
      try {
        c.close();
      } catch {
        // already closed
      }
    }
    try {
      Deno.removeSync(this.#path);
    } catch {
      // gone
    }
  }

  async #serveConn(conn: Deno.UnixConn): Promise<void> {
    /** Snapshots created on this connection with `session`: destroyed when it closes. */
    const session = new Set<string>();
    const decoder = new TextDecoder();
    const encoder = new TextEncoder();
    let pending = "";
    const buf = new Uint8Array(16 * 1024);
    try {
      for (;;) {
        const n = await conn.read(buf);
        if (n === null) return;
        pending += decoder.decode(buf.subarray(0, n), { stream: true });
        let nl: number;
        while ((nl = pending.indexOf("\n")) >= 0) {
          const line = pending.slice(0, nl);
          pending = pending.slice(nl + 1);
          if (line.trim() === "") continue;
          const reply = await this.#handleLine(line, session);
          try {
            await writeAll(conn, encoder.encode(JSON.stringify(reply) + "\n"));
          } finally {
            // The daemon exits after a handover, once its caller has the
            // answer (or is gone): it refuses every command from then on.
            if (this.#handoverAccepted) this.#requestHandover();
          }
        }
        if (pending.length > MAX_LINE_BYTES) {
          const reply = errorReply(
            0,
            new BlksnapError("E2BIG", `Request longer than ${MAX_LINE_BYTES} bytes`),
          );
          await writeAll(conn, encoder.encode(JSON.stringify(reply) + "\n"));
          return;
        }
      }
    } catch (err) {
      if (
        !(err instanceof Deno.errors.BrokenPipe || err instanceof Deno.errors.ConnectionReset ||
          this.#closed)
      ) {
        log(`connection error: ${err}`);
      }
    } finally {
      try {
        conn.close();
      } catch {
        // closed by close()
      }
      // Requests of a connection are served one at a time: none is running now.
      if (session.size > 0 && !this.#closed) await this.#endSession(session);
    }
  }

  /**
   * The client of `session` is gone (exited, killed, or gave up on a reply):
   * its session snapshots go with it. Not when the daemon itself stops
   * (close()): its shutdown or handover deals with every snapshot.
   */
  async #endSession(session: Set<string>): Promise<void> {
    for (const id of session) {
      try {
        await this.#daemon.snapshotDestroy(id);
        log(`snapshot ${id} destroyed: the connection that created it (session) closed`);
      } catch (err) {
        if (!(err instanceof BlksnapError && err.code === "ESRCH")) {
          log(`snapshot ${id} of a closed session: destroy failed: ${err}`);
        }
      }
    }
    session.clear();
  }

  async #handleLine(line: string, session: Set<string>): Promise<Reply> {
    let req: Envelope;
    try {
      req = parseRequest(line);
    } catch (err) {
      return errorReply(salvageId(line), err);
    }
    try {
      const result = await this.#dispatch(req, session);
      return { v: PROTOCOL_VERSION, id: req.id, ok: true, result };
    } catch (err) {
      return errorReply(req.id, err);
    }
  }

  #dispatch(req: Envelope, session: Set<string>): Promise<unknown> | unknown {
    const d = this.#daemon;
    const args = req.args as Record<string, string>;
    switch (req.op) {
      case "ping":
        return { pong: true };
      case "version":
        return d.version();
      case "status":
        return d.status();
      case "attach":
        return d.attach(args.device!);
      case "detach":
        return d.detach(args.device!);
      case "recover":
        return d.recover();
      case "detach_force":
        return d.detachForce(argsOf(req, "detach_force").device);
      case "shutdown":
        queueMicrotask(() => this.#requestShutdown());
        return { stopping: true };
      case "handover":
        return d.prepareHandover(argsOf(req, "handover").force).then((r) => {
          this.#handoverAccepted = true;
          return r;
        });
      case "cbtinfo":
        return d.cbtInfo(argsOf(req, "cbtinfo").device);
      case "readcbtmap":
        return d.readCbtMap(argsOf(req, "readcbtmap").device);
      case "markdirtyblock": {
        const a = argsOf(req, "markdirtyblock");
        return d.markDirty(a.device, a.ranges);
      }
      case "snapshot_create": {
        const a = argsOf(req, "snapshot_create");
        // Recorded before the reply is written: a client killed while it
        // waits for the reply leaves no snapshot either.
        return d.snapshotCreate(a).then((r) => {
          if (a.session === true) session.add(r.id);
          return r;
        });
      }
      case "snapshot_add":
        return d.snapshotAdd(argsOf(req, "snapshot_add"));
      case "snapshot_take":
        return d.snapshotTake(argsOf(req, "snapshot_take").id);
      case "snapshot_destroy": {
        const id = argsOf(req, "snapshot_destroy").id;
        return d.snapshotDestroy(id).then((r) => {
          session.delete(id);
          return r;
        });
      }
      case "snapshot_collect":
        return d.snapshotCollect();
      case "snapshot_info":
        return d.snapshotInfo(argsOf(req, "snapshot_info").device);
      case "snapshot_waitevent": {
        const a = argsOf(req, "snapshot_waitevent");
        return d.snapshotWaitEvent(a.id, a.timeoutMs);
      }
    }
  }
}

/** The arguments of a request already validated by parseRequest as operation `op`. */
function argsOf<O extends Op>(req: Envelope, _op: O): ArgsOf<O> {
  return req.args as ArgsOf<O>;
}

function errorReply(id: number, err: unknown): Reply {
  if (err instanceof BlksnapError) {
    return { v: PROTOCOL_VERSION, id, ok: false, error: errorBody(err) };
  }
  if (err instanceof ErrnoError) {
    return {
      v: PROTOCOL_VERSION,
      id,
      ok: false,
      error: { code: err.code, errno: err.errno, message: err.message },
    };
  }
  // A bug, not an operating error: say so loudly, keep serving.
  log(`internal error: ${err instanceof Error ? err.stack : String(err)}`);
  const message = `Internal error: ${err instanceof Error ? err.message : String(err)}`;
  return { v: PROTOCOL_VERSION, id, ok: false, error: { code: "EIO", errno: ERRNO.EIO, message } };
}

async function writeAll(conn: Deno.Conn, data: Uint8Array): Promise<void> {
  let off = 0;
  while (off < data.length) off += await conn.write(data.subarray(off));
}

/** True when something accepts connections on `path`. */
export async function isAlive(path: string): Promise<boolean> {
  try {
    const c = await Deno.connect({ transport: "unix", path });
    c.close();
    return true;
  } catch {
    return false;
  }
}
