/**
 * Helpers for the tests that run inside the VM (tests/vm/): run the blksnap
 * CLI as a user would, make loop devices, run shell tools, and check data by
 * checksum. Everything here talks to the real kernel.
 */
import { deepStrictEqual as assertEquals } from "node:assert/strict";
import { Client } from "../../lib/daemon/client.ts";
import type { Request } from "../../lib/daemon/protocol.ts";

export const IN_VM = Deno.env.get("BLKSNAP_IN_VM") === "1";
const ROOT = new URL("../../", import.meta.url).pathname;
export const MAIN = `${ROOT}main.ts`;

export interface Result {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs a program; returns its status and output (never throws on non-zero). */
export async function run(
  cmd: string,
  args: string[],
  env: Record<string, string> = {},
): Promise<Result> {
  const out = await new Deno.Command(cmd, {
    args,
    env,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  })
    .output();
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

/** Runs a program and requires status 0; returns trimmed stdout. */
export async function sh(cmd: string, ...args: string[]): Promise<string> {
  const r = await run(cmd, args);
  if (r.code !== 0) {
    throw new Error(`${cmd} ${args.join(" ")} exited ${r.code}\n${r.stdout}${r.stderr}`);
  }
  return r.stdout.trim();
}

/** A blksnap CLI bound to one socket, i.e. to one daemon. */
export class Cli {
  readonly socket: string;
  constructor(name: string) {
    this.socket = `/run/blksnap-test/${name}.sock`;
  }

  run(...args: string[]): Promise<Result> {
    return run(Deno.execPath(), ["run", "-A", "--quiet", MAIN, ...args], {
      BLKSNAP_SOCKET: this.socket,
    });
  }

  /** Runs and requires success; returns trimmed stdout. */
  async ok(...args: string[]): Promise<string> {
    const r = await this.run(...args);
    if (r.code !== 0) {
      throw new Error(
        `blksnap ${args.join(" ")} exited ${r.code}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`,
      );
    }
    return r.stdout.trim();
  }

  async json<T = Record<string, unknown>>(...args: string[]): Promise<T> {
    return JSON.parse(await this.ok(...args, "--json")) as T;
  }

  /** Stops this CLI's daemon (SIGTERM) and waits until it has exited. */
  async stopDaemon(): Promise<void> {
    const s = await this.json<{ running: boolean; pid?: number }>("status");
    if (!s.running || !s.pid) return;
    Deno.kill(s.pid, "SIGTERM");
    const deadline = Date.now() + 120_000;
    while (Date.now() < deadline) {
      try {
        Deno.statSync(`/proc/${s.pid}`);
      } catch {
        return;
      }
      await sleep(50);
    }
    throw new Error(`daemon ${s.pid} did not exit after SIGTERM`);
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** A loop device over a file in the guest's tmpfs. */
export class Loop {
  readonly path: string;
  readonly file: string;
  private constructor(path: string, file: string) {
    this.path = path;
    this.file = file;
  }

  /** A loop device of `sizeMiB` over a sparse file, with `sectorSize`-byte logical sectors. */
  static async create(sizeMiB: number, sectorSize = 512): Promise<Loop> {
    await Deno.mkdir("/tmp/loops", { recursive: true });
    const file = await Deno.makeTempFile({ dir: "/tmp/loops", suffix: ".img" });
    await Deno.truncate(file, sizeMiB * 1024 * 1024);
    const path = await sh(
      "losetup",
      "--find",
      "--show",
      ...(sectorSize !== 512 ? ["--sector-size", String(sectorSize)] : []),
      file,
    );
    return new Loop(path, file);
  }

  async destroy(): Promise<void> {
    await run("losetup", ["-d", this.path]);
    await Deno.remove(this.file).catch(() => {});
  }
}

export async function sha256(path: string): Promise<string> {
  const data = await Deno.readFile(path);
  const digest = await crypto.subtle.digest("SHA-256", data);
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

/** Deterministic pseudo-random bytes (xorshift32) so a failure can be replayed. */
export function pseudoRandomBytes(seed: number, length: number): Uint8Array {
  const out = new Uint8Array(length);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < length; i += 4) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    out[i] = x & 0xff;
    out[i + 1] = (x >>> 8) & 0xff;
    out[i + 2] = (x >>> 16) & 0xff;
    out[i + 3] = (x >>> 24) & 0xff;
  }
  return out;
}

/** Block device nodes of ublk that exist right now. */
export function ublkNodes(): string[] {
  return [...Deno.readDirSync("/dev")].map((e) => e.name).filter((n) => /^ublk[bc]\d+$/.test(n))
    .sort();
}

export function assertNoUblkDevices(): void {
  assertEquals(ublkNodes(), [], "ublk devices left behind");
  let sys: string[] = [];
  try {
    sys = [...Deno.readDirSync("/sys/class/ublk-char")].map((e) => e.name);
  } catch {
    // class absent: no device
  }
  assertEquals(sys, [], "ublk char devices left in sysfs");
}

/** Deno.test options for VM tests: outside the VM they are reported as ignored. */
export function vmTest(name: string, fn: () => Promise<void>): void {
  Deno.test({ name, ignore: !IN_VM, sanitizeOps: false, sanitizeResources: false, fn });
}

/** A Cli whose commands also get `env`, e.g. BLKSNAP_DAEMON_ARGS for the daemon they start. */
export class EnvCli extends Cli {
  readonly env: Record<string, string>;
  constructor(name: string, env: Record<string, string>) {
    super(name);
    this.env = env;
  }

  override run(...args: string[]): Promise<Result> {
    return run(Deno.execPath(), ["run", "-A", "--quiet", MAIN, ...args], {
      ...this.env,
      BLKSNAP_SOCKET: this.socket,
    });
  }
}

/** The log of the daemon a CLI autostarted (`daemon.log` beside the socket), or "". */
export function daemonLog(cli: Cli): string {
  const dir = cli.socket.slice(0, cli.socket.lastIndexOf("/"));
  try {
    return Deno.readTextFileSync(`${dir}/daemon.log`);
  } catch {
    return "";
  }
}

/**
 * Runs `fn`; when it throws, prints the last `lines` lines of the daemon's log
 * (so that they show in the VM output) and rethrows.
 */
export async function withDaemonLog<T>(cli: Cli, fn: () => Promise<T>, lines = 80): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    const log = daemonLog(cli).trimEnd().split("\n").slice(-lines).join("\n");
    console.error(`---- daemon log (${cli.socket}), last ${lines} lines ----\n${log}\n----`);
    throw err;
  }
}

/** sha256 of bytes, as hex. */
export async function sha256Of(data: Uint8Array): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", new Uint8Array(data));
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * Reads `count` blocks of `bs` bytes at block `skip` of a device with dd
 * (O_DIRECT); returns the bytes, or throws with dd's message when it fails.
 */
export async function ddRead(
  path: string,
  bs: number,
  skip: number,
  count: number,
): Promise<Uint8Array> {
  const out = await new Deno.Command("dd", {
    args: [
      `if=${path}`,
      `bs=${bs}`,
      `skip=${skip}`,
      `count=${count}`,
      "iflag=direct",
      "status=none",
    ],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  if (out.code !== 0) {
    throw new Error(`dd if=${path} exited ${out.code}: ${new TextDecoder().decode(out.stderr)}`);
  }
  return out.stdout;
}

/** Writes `data` at byte `offset` of a device with dd (O_DIRECT, conv=notrunc). */
export async function ddWrite(path: string, data: Uint8Array, offset: number): Promise<void> {
  const bs = 65536;
  if (offset % bs !== 0 || data.length % bs !== 0) {
    throw new Error("ddWrite: offset and length must be multiples of 64 KiB");
  }
  const src = await Deno.makeTempFile({ suffix: ".dd" });
  try {
    await Deno.writeFile(src, data);
    await sh(
      "dd",
      `if=${src}`,
      `of=${path}`,
      `bs=${bs}`,
      `seek=${offset / bs}`,
      "oflag=direct",
      "conv=notrunc",
      "status=none",
    );
  } finally {
    await Deno.remove(src).catch(() => {});
  }
}

/** `length` bytes from the kernel's random generator. */
export function randomBytes(length: number): Uint8Array {
  const out = new Uint8Array(length);
  for (let off = 0; off < length; off += 65536) {
    crypto.getRandomValues(out.subarray(off, Math.min(length, off + 65536)));
  }
  return out;
}

/** The sha256 of each `blockBytes` block of `data`. */
export async function blockSums(data: Uint8Array, blockBytes: number): Promise<string[]> {
  const sums: string[] = [];
  for (let off = 0; off < data.length; off += blockBytes) {
    sums.push(await sha256Of(data.subarray(off, off + blockBytes)));
  }
  return sums;
}

/** Indices where two lists of block sums differ (a length difference counts from the shorter). */
export function differingBlocks(got: string[], want: string[]): number[] {
  const out: number[] = [];
  for (let i = 0; i < Math.max(got.length, want.length); i++) {
    if (got[i] !== want[i]) out.push(i);
  }
  return out;
}

/**
 * One request straight to a CLI's daemon over its socket (fast: no CLI process),
 * e.g. `daemonRequest(cli, "status", {})`.
 */
export async function daemonRequest<T = unknown, R extends Request = Request>(
  cli: Cli,
  op: R["op"],
  args: R["args"],
): Promise<T> {
  const client = await Client.connect(cli.socket);
  try {
    return await client.request<R>(op, args) as T;
  } finally {
    client.close();
  }
}

/**
 * A stopwatch for a test's steps: `lap("what")` prints the time since the
 * previous lap when BLKSNAP_TEST_TIMING=1 (tools/vm.sh forwards it into the VM).
 */
export function stopwatch(name: string): (what: string) => void {
  const on = Deno.env.get("BLKSNAP_TEST_TIMING") === "1";
  const t0 = performance.now();
  let last = t0;
  return (what) => {
    const now = performance.now();
    if (on) {
      console.log(
        `[${name}] ${what}: ${((now - last) / 1000).toFixed(1)} s (total ${
          ((now - t0) / 1000).toFixed(1)
        } s)`,
      );
    }
    last = now;
  };
}

/**
 * fio writing 4 KiB blocks at random with crc32c verification, depth 32, one
 * job per CPU (so both ublk queues serve it), each over its 32 MiB half of a
 * 64 MiB device, until stop(): which ends it (SIGINT) and returns its output.
 */
export function startVerifyingFio(
  filename: string,
  options: { name: string; verifyBacklog: number; extra?: string[] },
): { stop(): Promise<string> } {
  const fio = new Deno.Command("fio", {
    args: [
      `--filename=${filename}`,
      `--name=${options.name}`,
      "--ioengine=io_uring",
      "--direct=1",
      "--iodepth=32",
      "--numjobs=2",
      "--cpus_allowed=0-1",
      "--cpus_allowed_policy=split",
      "--size=32M",
      "--offset_increment=32M",
      "--rw=randwrite",
      "--bs=4k",
      "--verify=crc32c",
      `--verify_backlog=${options.verifyBacklog}`,
      "--verify_fatal=1",
      "--time_based",
      "--runtime=600",
      "--group_reporting",
      ...(options.extra ?? []),
    ],
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  return {
    async stop() {
      try {
        fio.kill("SIGINT");
      } catch {
        // already exited
      }
      const out = await fio.output();
      const dec = new TextDecoder();
      return dec.decode(out.stdout) + dec.decode(out.stderr);
    },
  };
}
