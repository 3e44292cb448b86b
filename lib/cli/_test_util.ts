/**
 * Test helpers for the CLI: run `main()` in-process with stdout and stderr
 * captured, against a fake daemon on a temporary socket that validates every
 * request with the real parseRequest() and answers with canned results.
 */
import { main } from "./main.ts";
import {
  type Envelope,
  errorBody,
  MAX_LINE_BYTES,
  parseRequest,
  PROTOCOL_VERSION,
  salvageId,
} from "../daemon/protocol.ts";
import { BlksnapError } from "../../ffi/errno.ts";

export interface CliResult {
  code: number;
  out: string;
  err: string;
}

/** Runs the CLI with BLKSNAP_SOCKET=`socket` (a path nobody listens on by default). */
export async function cli(socket: string | undefined, ...argv: string[]): Promise<CliResult> {
  const out: string[] = [];
  const err: string[] = [];
  const { log, error } = console;
  console.log = (...a: unknown[]) => out.push(a.join(" "));
  console.error = (...a: unknown[]) => err.push(a.join(" "));
  const dir = socket === undefined ? Deno.makeTempDirSync() : undefined;
  Deno.env.set("BLKSNAP_SOCKET", socket ?? `${dir}/none.sock`);
  try {
    const code = await main(argv);
    return { code, out: out.join("\n"), err: err.join("\n") };
  } finally {
    console.log = log;
    console.error = error;
    Deno.env.delete("BLKSNAP_SOCKET");
    if (dir) Deno.removeSync(dir, { recursive: true });
  }
}

/** Returned by a handler: the fake daemon closes the connection instead of answering. */
export const HANG_UP = Symbol("hang up");

/** Answers one valid request: a result, a thrown BlksnapError, or HANG_UP. */
export type Handler = (req: Envelope) => unknown;

export interface FakeDaemon {
  socket: string;
  /** Every valid request received, in order. */
  requests: Envelope[];
  /** Requests parseRequest() refused (a CLI bug: the tests expect none). */
  rejected: string[];
}

/** Runs `fn` with a fake daemon listening; tears everything down after. */
export async function withFakeDaemon(
  handler: Handler,
  fn: (d: FakeDaemon) => Promise<void>,
): Promise<void> {
  const dir = Deno.makeTempDirSync();
  const socket = `${dir}/control.sock`;
  const listener = Deno.listen({ transport: "unix", path: socket });
  const d: FakeDaemon = { socket, requests: [], rejected: [] };
  const conns = new Set<Deno.UnixConn>();
  const serving: Promise<void>[] = [];
  const accepting = (async () => {
    for (;;) {
      let conn: Deno.UnixConn;
      try {
        conn = await listener.accept();
      } catch {
        return; // closed
      }
      conns.add(conn);
      serving.push(serve(conn, handler, d).finally(() => conns.delete(conn)));
    }
  })();
  try {
    await fn(d);
  } finally {
    listener.close();
    await accepting;
    for (const c of conns) {
      try {
        c.close();
      } catch {
        // closed meanwhile
      }
    }
    await Promise.all(serving);
    Deno.removeSync(dir, { recursive: true });
  }
}

async function serve(conn: Deno.UnixConn, handler: Handler, d: FakeDaemon): Promise<void> {
  const decoder = new TextDecoder();
  const encoder = new TextEncoder();
  const buf = new Uint8Array(64 * 1024);
  let pending = "";
  try {
    for (;;) {
      const n = await conn.read(buf);
      if (n === null) return;
      pending += decoder.decode(buf.subarray(0, n), { stream: true });
      let nl: number;
      while ((nl = pending.indexOf("\n")) >= 0) {
        const line = pending.slice(0, nl);
        pending = pending.slice(nl + 1);
        let reply: unknown;
        let req: Envelope | undefined;
        try {
          if (encoder.encode(line).length > MAX_LINE_BYTES) {
            throw new BlksnapError("E2BIG", `Request longer than ${MAX_LINE_BYTES} bytes`);
          }
          req = parseRequest(line);
          d.requests.push(req);
        } catch (err) {
          if (!(err instanceof BlksnapError)) throw err;
          d.rejected.push(`${err.message}: ${line.slice(0, 200)}`);
          reply = { v: PROTOCOL_VERSION, id: salvageId(line), ok: false, error: errorBody(err) };
        }
        if (req) {
          try {
            const result = await handler(req);
            if (result === HANG_UP) {
              conn.close();
              return;
            }
            reply = { v: PROTOCOL_VERSION, id: req.id, ok: true, result };
          } catch (err) {
            if (!(err instanceof BlksnapError)) throw err;
            reply = { v: PROTOCOL_VERSION, id: req.id, ok: false, error: errorBody(err) };
          }
        }
        const data = encoder.encode(JSON.stringify(reply) + "\n");
        for (let off = 0; off < data.length;) off += await conn.write(data.subarray(off));
      }
    }
  } catch (err) {
    // the connection closed under a pending read (teardown or HANG_UP)
    if (
      !(err instanceof Deno.errors.BadResource || err instanceof Deno.errors.ConnectionReset ||
        err instanceof Deno.errors.Interrupted || err instanceof Deno.errors.BrokenPipe)
    ) {
      throw err;
    }
  } finally {
    try {
      conn.close();
    } catch {
      // closed by HANG_UP or teardown
    }
  }
}
