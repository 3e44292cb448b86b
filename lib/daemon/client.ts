/**
 * The CLI's side of the control socket: one connection, numbered requests,
 * and starting the daemon when a command needs it and none is running.
 */
import { PROTOCOL_VERSION, type Reply, type Request } from "./protocol.ts";
import { DaemonLock } from "./daemon_lock.ts";
import { besideSocket, readStateFile } from "./state_file.ts";

/** The daemon answered with an error. */
export class DaemonError extends Error {
  readonly code: string;
  readonly errno: number;
  constructor(code: string, errno: number, message: string) {
    super(message);
    this.name = "DaemonError";
    this.code = code;
    this.errno = errno;
  }
}

/** No daemon could be reached (or started). */
export class DaemonUnavailableError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "DaemonUnavailableError";
  }
}

/** Nothing listens on the socket: no daemon runs (as opposed to one we may not reach). */
export class NoDaemonError extends DaemonUnavailableError {
  constructor(message: string) {
    super(message);
    this.name = "NoDaemonError";
  }
}

export class Client {
  readonly #conn: Deno.UnixConn;
  #nextId = 1;
  #buffered = "";
  readonly #decoder = new TextDecoder();

  private constructor(conn: Deno.UnixConn) {
    this.#conn = conn;
  }

  static async connect(path: string): Promise<Client> {
    try {
      return new Client(await Deno.connect({ transport: "unix", path }));
    } catch (err) {
      if (err instanceof Deno.errors.PermissionDenied) {
        throw new DaemonUnavailableError(
          `Cannot connect to "${path}": permission denied (run as root)`,
        );
      }
      throw new NoDaemonError(`No blksnap daemon answers on "${path}"`);
    }
  }

  /**
   * One request and its reply. Without a reply in `timeoutMs` (default
   * requestTimeoutMs(), plus the wait a snapshot_waitevent asks for) the
   * connection is closed and DaemonUnavailableError says so: a daemon stuck
   * on one device must not hang the caller for ever.
   */
  async request<R extends Request>(
    op: R["op"],
    args: R["args"],
    timeoutMs = requestTimeoutMs(op, args),
  ): Promise<unknown> {
    const id = this.#nextId++;
    const line = JSON.stringify({ v: PROTOCOL_VERSION, id, op, args }) + "\n";
    const data = new TextEncoder().encode(line);
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      this.close();
    }, timeoutMs);
    let reply: Reply;
    try {
      let off = 0;
      while (off < data.length) off += await this.#conn.write(data.subarray(off));
      reply = JSON.parse(await this.#readLine()) as Reply;
    } catch (err) {
      if (timedOut) {
        throw new DaemonUnavailableError(
          `The daemon did not answer ${op} in ${Math.round(timeoutMs / 1000)} s ` +
            `(is a device stuck? see "blksnap status" and the daemon's log)`,
        );
      }
      if (err instanceof DaemonUnavailableError) throw err;
      if (err instanceof SyntaxError) {
        throw new DaemonUnavailableError("The daemon sent a malformed reply");
      }
      throw err;
    } finally {
      clearTimeout(timer);
    }
    if (reply.id !== id) throw new Error(`Protocol error: reply ${reply.id} to request ${id}`);
    if (!reply.ok) throw new DaemonError(reply.error.code, reply.error.errno, reply.error.message);
    return reply.result;
  }

  async #readLine(): Promise<string> {
    const buf = new Uint8Array(64 * 1024);
    for (;;) {
      const nl = this.#buffered.indexOf("\n");
      if (nl >= 0) {
        const line = this.#buffered.slice(0, nl);
        this.#buffered = this.#buffered.slice(nl + 1);
        return line;
      }
      const n = await this.#conn.read(buf);
      if (n === null) throw new DaemonUnavailableError("The daemon closed the connection");
      this.#buffered += this.#decoder.decode(buf.subarray(0, n), { stream: true });
    }
  }

  close(): void {
    try {
      this.#conn.close();
    } catch {
      // already closed
    }
  }
}

/** Default request timeout: BLKSNAP_REQUEST_TIMEOUT_MS, else 10 minutes. */
export const DEFAULT_REQUEST_TIMEOUT_MS = 600_000;

/** How long `op` may take before the client gives up on the daemon. */
export function requestTimeoutMs(op: string, args: unknown): number {
  const env = Number(Deno.env.get("BLKSNAP_REQUEST_TIMEOUT_MS") ?? "");
  const base = Number.isSafeInteger(env) && env > 0 ? env : DEFAULT_REQUEST_TIMEOUT_MS;
  const wait = op === "snapshot_waitevent" ? (args as { timeoutMs?: unknown }).timeoutMs : 0;
  return base + (typeof wait === "number" && wait > 0 ? wait : 0);
}

export interface StartOptions {
  socketPath: string;
  /** Extra `blksnap daemon` options (e.g. parameters from BLKSNAP_DAEMON_ARGS). */
  daemonArgs: string[];
  timeoutMs?: number;
}

/** The command that runs this program again with `args` (deno run, or the compiled binary). */
export function selfCommand(args: string[]): { cmd: string; args: string[] } {
  const exec = Deno.execPath();
  const isDeno = /(^|\/)deno$/.test(exec);
  if (isDeno) {
    return { cmd: exec, args: ["run", "--allow-all", "--quiet", Deno.mainModule, ...args] };
  }
  return { cmd: exec, args };
}

/** Starts `blksnap daemon` in the background and waits until it answers. */
export async function startDaemon(opts: StartOptions): Promise<number> {
  const dir = opts.socketPath.slice(0, opts.socketPath.lastIndexOf("/")) || "/";
  const logFile = `${dir}/daemon.log`;
  try {
    Deno.mkdirSync(dir, { recursive: true, mode: 0o755 });
  } catch (err) {
    throw new DaemonUnavailableError(
      `Cannot start the daemon: cannot create "${dir}": ${
        err instanceof Error ? err.message : err
      }`,
    );
  }
  const self = selfCommand([
    "daemon",
    "--socket",
    opts.socketPath,
    "--log-file",
    logFile,
    ...opts.daemonArgs,
  ]);
  const child = new Deno.Command(self.cmd, {
    args: self.args,
    stdin: "null",
    stdout: "null",
    stderr: "null",
  }).spawn();
  child.unref();
  let exited: Deno.CommandStatus | undefined;
  child.status.then((s) => (exited = s));
  const deadline = performance.now() + (opts.timeoutMs ?? 120_000);
  while (performance.now() < deadline) {
    try {
      const c = await Deno.connect({ transport: "unix", path: opts.socketPath });
      c.close();
      return child.pid;
    } catch {
      // not yet
    }
    // Lost the race for the daemon lock to a daemon another command started:
    // that one serves us too, once it answers.
    if (exited && !DaemonLock.isHeld(besideSocket(opts.socketPath, "lock"))) {
      throw new DaemonUnavailableError(
        `The daemon exited with status ${exited.code} while starting; see ${logFile}:\n${
          tail(logFile)
        }`,
      );
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new DaemonUnavailableError(
    `The daemon did not answer on "${opts.socketPath}" in time; see ${logFile}`,
  );
}

/**
 * Whether a daemon that is no longer running left ublk devices (its state
 * file names some, or cannot be read): I/O to them waits for a daemon, so
 * even commands that never start one should start one then.
 */
export function devicesLeftBehind(socketPath: string): boolean {
  try {
    const state = readStateFile(besideSocket(socketPath, "state"));
    return state !== null && state.devices.length > 0;
  } catch {
    return true;
  }
}

function tail(path: string): string {
  try {
    return Deno.readTextFileSync(path).trimEnd().split("\n").slice(-10).join("\n");
  } catch {
    return "(no log)";
  }
}
