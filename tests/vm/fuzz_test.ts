/**
 * The control socket under a seeded fuzzer: random bytes and mutated requests
 * (characters flipped, inserted and deleted; values replaced by wrong types,
 * huge and negative numbers, long strings, odd Unicode; unknown ops and
 * versions; overlong lines; lines cut off by a closed connection) sent to a
 * live daemon that serves a tracked device. The daemon answers each line with
 * one reply or drops the connection, keeps serving, and nothing it serves
 * changes: same devices, same CBT map, same data on the tracked device.
 *
 * A blank line gets no reply (the daemon skips it, as it skips empty lines).
 * Every wait for the daemon is bounded: one that neither answers nor drops the
 * connection fails the test with the line, not hangs it.
 *
 * A mutated line that happens to be a valid request of an operation that
 * changes state (attach, detach, markdirtyblock, snapshots, shutdown) is not
 * sent: the protocol's own parser decides. BLKSNAP_FUZZ_SEED and
 * BLKSNAP_FUZZ_COUNT replay or lengthen a run; the seed is printed on failure.
 */
import { deepStrictEqual as assertEquals, ok as assert } from "node:assert/strict";
import { parseRequest } from "../../lib/daemon/protocol.ts";
import { Rng } from "../../lib/engine/_test_util.ts";
import { Cli, Loop, pseudoRandomBytes, sha256, sleep, vmTest } from "./_helpers.ts";

const COUNT = Number(Deno.env.get("BLKSNAP_FUZZ_COUNT") ?? "3000");
const SEED = Number(Deno.env.get("BLKSNAP_FUZZ_SEED") ?? String(Date.now() % 2 ** 31));

/** Operations that read only: a mutated line may stay one of these. */
const HARMLESS = new Set([
  "ping",
  "version",
  "status",
  "cbtinfo",
  "readcbtmap",
  "snapshot_info",
  "snapshot_collect",
]);

interface Status {
  running: boolean;
  pid: number;
  devices: Array<{
    original: string;
    tracked: string;
    ublkId: number;
    sizeBytes: number;
    cbt?: { generationId: string; changesNumber: number };
  }>;
  snapshots: unknown[];
}

/** The frozen CBT map (readcbtmap --file) and the tracker's summary (cbtinfo). */
async function cbtState(cli: Cli, device: string): Promise<[Uint8Array, unknown]> {
  const file = `/tmp/fuzz-cbt.map`;
  await cli.ok("readcbtmap", "--device", device, "--file", file);
  const map = await Deno.readFile(file);
  await Deno.remove(file);
  return [map, await cli.json("cbtinfo", "--device", device)];
}

export class Fuzzer {
  readonly #r: Rng;
  readonly #device: string;
  readonly #tracked: string;
  constructor(seed: number, device: string, tracked: string) {
    this.#r = new Rng(seed);
    this.#device = device;
    this.#tracked = tracked;
  }

  int(n: number): number {
    return Math.floor(this.#r.next() * n);
  }

  pick<T>(xs: readonly T[]): T {
    return xs[this.int(xs.length)]!;
  }

  /** A value of a random kind, often a wrong one. */
  value(depth = 0): unknown {
    switch (this.int(depth > 2 ? 9 : 11)) {
      case 0:
        return null;
      case 1:
        return this.pick([true, false]);
      case 2:
        return this.pick([0, -1, 1, 2 ** 31, -(2 ** 53), 2 ** 64, 1e308, 0.5, NaN]);
      case 3:
        return this.pick(["", "x".repeat(this.int(5000)), "\u0000", "\ud800", "é", "../.."]);
      case 4:
        return this.pick([this.#device, this.#tracked, "/dev/null", "/", "/proc/self/mem"]);
      case 5:
        return crypto.randomUUID();
      case 6:
        return this.pick(["/dev/loop", "/dev/ublkb0", "/dev/sda", "relative/path"]);
      case 7:
        return this.int(1000);
      case 8:
        return this.pick(["1:2", "0:0", "-5:7", "9999999999999:1"]);
      case 9:
        return Array.from({ length: this.int(4) }, () => this.value(depth + 1));
      default: {
        const o: Record<string, unknown> = {};
        for (let i = this.int(4); i > 0; i--) o[this.key()] = this.value(depth + 1);
        return o;
      }
    }
  }

  key(): string {
    return this.pick([
      "device",
      "devices",
      "id",
      "ranges",
      "sector",
      "count",
      "storage",
      "limitBytes",
      "clientPid",
      "timeoutMs",
      "__proto__",
      "constructor",
      "x",
    ]);
  }

  /** A request object close to a valid one. */
  request(): Record<string, unknown> {
    const op = this.pick([
      "ping",
      "version",
      "status",
      "attach",
      "detach",
      "shutdown",
      "cbtinfo",
      "readcbtmap",
      "markdirtyblock",
      "snapshot_create",
      "snapshot_add",
      "snapshot_take",
      "snapshot_destroy",
      "snapshot_collect",
      "snapshot_info",
      "snapshot_waitevent",
      "nope",
      "",
    ]);
    const args: Record<string, unknown> = {};
    for (let i = this.int(4); i > 0; i--) args[this.key()] = this.value();
    if (this.int(3) === 0) args.device = this.#device;
    const req: Record<string, unknown> = {
      v: this.int(10) === 0 ? this.value() : 1,
      id: this.int(10) === 0 ? this.value() : this.int(1_000_000),
      op: this.int(10) === 0 ? this.value() : op,
      args: this.int(10) === 0 ? this.value() : args,
    };
    if (this.int(8) === 0) delete req[this.pick(["v", "id", "op", "args"])];
    if (this.int(8) === 0) req[this.key()] = this.value();
    return req;
  }

  /** Byte-level mutations of a line. */
  mutate(line: string): string {
    let s = line;
    for (let i = this.int(4); i > 0; i--) {
      const at = this.int(s.length + 1);
      switch (this.int(4)) {
        case 0:
          s = s.slice(0, at) + s.slice(at + 1 + this.int(8));
          break;
        case 1:
          s = s.slice(0, at) + this.pick(['"', "{", "}", "[", "]", ",", ":", "\\", "0", "é"]) +
            s.slice(at);
          break;
        case 2:
          s = s.slice(0, at) + String.fromCharCode(this.int(0x3000)) + s.slice(at + 1);
          break;
        default:
          s = s.slice(0, at) + s.slice(at, at + this.int(30)).repeat(this.int(3)) + s.slice(at);
      }
    }
    return s.replaceAll("\n", " ");
  }

  /** One line to send (without its newline), as bytes. */
  line(): Uint8Array {
    const enc = new TextEncoder();
    switch (this.int(10)) {
      case 0: // random bytes, no newline inside
        return pseudoRandomBytes(this.int(2 ** 30), 1 + this.int(300)).map((b) =>
          b === 10 ? 32 : b
        );
      case 1:
        return enc.encode(JSON.stringify(this.value()) ?? "undefined");
      case 2:
        return enc.encode(this.mutate(JSON.stringify(this.request())));
      default:
        return enc.encode(JSON.stringify(this.request()));
    }
  }
}

/** Whether a line must not be sent: a valid request that changes state. */
export function changesState(line: Uint8Array): boolean {
  try {
    const env = parseRequest(new TextDecoder().decode(line));
    return !HARMLESS.has(env.op);
  } catch {
    return false;
  }
}

/** A connection that reads reply lines. */
class Conn {
  readonly #conn: Deno.UnixConn;
  #buf = "";
  readonly #dec = new TextDecoder();
  private constructor(conn: Deno.UnixConn) {
    this.#conn = conn;
  }
  static async open(path: string): Promise<Conn> {
    return new Conn(await Deno.connect({ transport: "unix", path }));
  }
  /** Writes all of `bytes`; throws when the daemon takes none for `timeoutMs`. */
  async send(bytes: Uint8Array, timeoutMs = 30_000): Promise<void> {
    let off = 0;
    while (off < bytes.length) {
      off += await this.#bounded(this.#conn.write(bytes.subarray(off)), timeoutMs, "take a line");
    }
  }
  /** The next reply line, or null when the daemon closed the connection. */
  async reply(timeoutMs = 30_000): Promise<string | null> {
    const chunk = new Uint8Array(65536);
    for (;;) {
      const nl = this.#buf.indexOf("\n");
      if (nl >= 0) {
        const line = this.#buf.slice(0, nl);
        this.#buf = this.#buf.slice(nl + 1);
        return line;
      }
      const n = await this.#bounded(
        this.#conn.read(chunk).catch(() => null),
        timeoutMs,
        "reply",
      );
      if (n === null) return null;
      this.#buf += this.#dec.decode(chunk.subarray(0, n), { stream: true });
    }
  }
  /**
   * `op`, or an error after `timeoutMs` (the connection is closed then, so
   * the read or write under way ends): a daemon that neither answers nor
   * drops the connection fails the test instead of hanging it.
   */
  async #bounded<T>(op: Promise<T>, timeoutMs: number, what: string): Promise<T> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const expired = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        this.close();
        reject(new Error(`the daemon did not ${what} within ${timeoutMs} ms`));
      }, timeoutMs);
    });
    try {
      return await Promise.race([op, expired]);
    } finally {
      clearTimeout(timer);
    }
  }
  close(): void {
    try {
      this.#conn.close();
    } catch {
      // already closed by the daemon
    }
  }
}

vmTest(
  "fuzzed control requests: the daemon answers or drops each and nothing changes",
  async () => {
    const cli = new Cli("fuzz");
    const loop = await Loop.create(64);
    let sent = 0;
    let last: Uint8Array = new Uint8Array(0);
    try {
      await cli.ok("attach", "--device", loop.path);
      const before = await cli.json<Status>("status");
      assertEquals(before.devices.length, 1);
      const tracked = before.devices[0]!.tracked;
      await Deno.writeFile(tracked, pseudoRandomBytes(SEED, 4 << 20));
      await cli.ok("markdirtyblock", "--device", loop.path, "--range", "0:8");
      const cbtBefore = await cbtState(cli, loop.path);
      const sumBefore = await sha256(tracked);

      const f = new Fuzzer(SEED, loop.path, tracked);
      let conn = await Conn.open(cli.socket);
      // Blank lines get no reply: the next request's reply is the first one.
      await conn.send(
        new TextEncoder().encode(
          ` \n\r\n\u3000\n\t\n${JSON.stringify({ v: 1, id: 7, op: "ping", args: {} })}\n`,
        ),
      );
      const pong = JSON.parse((await conn.reply())!) as { id: number; ok: boolean };
      assertEquals([pong.id, pong.ok], [7, true], "blank lines skipped, then ping answered");
      let answered = 0;
      let dropped = 0;
      let skipped = 0;
      let blank = 0;
      while (sent < COUNT) {
        let line = f.line();
        if (changesState(line)) {
          skipped++;
          continue;
        }
        if (f.int(200) === 0) line = new Uint8Array(70 * 1024).fill(0x41); // longer than the limit
        sent++;
        if (f.int(100) === 0) {
          // a line cut off by the client going away
          await conn.send(line);
          conn.close();
          conn = await Conn.open(cli.socket);
          continue;
        }
        const nl = new Uint8Array(line.length + 1);
        nl.set(line);
        nl[line.length] = 10;
        if (new TextDecoder().decode(line).trim() === "") {
          // A blank line (spaces, a lone \r, U+3000...) is skipped without a reply.
          await conn.send(nl);
          blank++;
          continue;
        }
        last = line;
        await conn.send(nl).catch((e) => {
          if (e instanceof Error && e.message.startsWith("the daemon did not")) throw e;
        });
        const reply = await conn.reply();
        if (reply === null) {
          dropped++;
          conn.close();
          conn = await Conn.open(cli.socket);
          continue;
        }
        const r = JSON.parse(reply) as { v: number; ok: boolean; error?: { code: string } };
        assertEquals(r.v, 1, `a reply of protocol 1: ${reply.slice(0, 200)}`);
        assertEquals(typeof r.ok, "boolean", `ok is a boolean: ${reply.slice(0, 200)}`);
        if (!r.ok) assert(r.error && typeof r.error.code === "string", `an error code: ${reply}`);
        answered++;
      }
      conn.close();
      console.log(
        `fuzz seed ${SEED}: ${sent} lines sent, ${answered} answered, ${blank} blank, ` +
          `${dropped} connections dropped, ${skipped} state-changing requests not sent`,
      );
      assert(answered > COUNT / 2, "most lines get an answer");

      // Still serving, and nothing changed.
      await sleep(100);
      const after = await cli.json<Status>("status");
      assertEquals(after.pid, before.pid, "the same daemon");
      assertEquals(
        after.devices.map((d) => [d.original, d.tracked, d.ublkId, d.sizeBytes, d.cbt]),
        before.devices.map((d) => [d.original, d.tracked, d.ublkId, d.sizeBytes, d.cbt]),
      );
      assertEquals(after.snapshots, before.snapshots);
      const cbtAfter = await cbtState(cli, loop.path);
      assertEquals(cbtAfter, cbtBefore);
      assertEquals(await sha256(tracked), sumBefore);
    } catch (err) {
      console.error(
        `fuzz failed with BLKSNAP_FUZZ_SEED=${SEED} after ${sent} lines; the last: ${
          JSON.stringify(new TextDecoder().decode(last.subarray(0, 400)))
        }`,
      );
      throw err;
    } finally {
      await cli.run("detach", "--device", loop.path);
      await cli.stopDaemon().catch(() => {});
      await loop.destroy();
    }
  },
);
