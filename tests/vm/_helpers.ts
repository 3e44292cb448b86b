/**
 * Helpers for the tests that run inside the VM (tests/vm/): run the blksnap
 * CLI as a user would, make loop devices, run shell tools, and check data by
 * checksum. Everything here talks to the real kernel.
 */
import { deepStrictEqual as assertEquals } from "node:assert/strict";

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
