/**
 * Benchmark (deno task bench; runs inside the VM). fio (io_uring, direct,
 * depth 32) in one VM run, stacks alternating, each line repeated and the
 * medians reported:
 *
 *  A. passthrough, no snapshot: the raw loop device, dm-linear over a twin loop
 *     device, ublk-ref (the minimal C ublk passthrough server, the ublk
 *     transport's own cost) over the twin, and our tracked device (tracking on)
 *     over the first loop; 4k random and 1M sequential reads and writes.
 *  B. writes with a snapshot held (256 KiB chunks on both sides): FIRST writes
 *     after the take, each a write to a never-copied chunk (a fresh snapshot
 *     per run; the 4k ones replay a random permutation of chunk-aligned
 *     offsets, the 1M ones are one sequential pass), and REWRITES of copied
 *     chunks; ours (tracked device + blksnap snapshot, storage a loop device like
 *     dm-snapshot's COW, or with BLKSNAP_BENCH_STORAGE=tmpfile a file on tmpfs) against
 *     our tracked device without a snapshot, dm-snapshot (snapshot-origin +
 *     snapshot, transient store, COW on a third loop device) against dm-linear.
 *  C. snapshot reads with about half the chunks in the difference storage: our
 *     snapshot image against the tracked device, dm-snapshot's snapshot device
 *     against its origin.
 *
 * Prints the tables (and the guest CPU time per I/O: the VM is CPU-bound under
 * TCG, so it is the steadier figure) and writes JSON to $BLKSNAP_OUT_DIR
 * (copied to bench/results/ on the host). Under TCG absolute numbers mean
 * little; ratios measured in one run do.
 *
 * Failures of a stack (our snapshot path included) are recorded with evidence
 * (the command, its output, the daemon log and kernel messages) and the rest of
 * the benchmark goes on; the exit status is then 1.
 *
 * Environment: BLKSNAP_BENCH_RUNTIME (seconds per fio run, default 6),
 * BLKSNAP_BENCH_REPEATS (default 3), BLKSNAP_BENCH_PARTS (default "ABCD"; D:
 * backups, bench/backup_bench.ts),
 * BLKSNAP_BENCH_ONLY_A (a regular expression: the part A workloads to run),
 * BLKSNAP_BENCH_VARIANT (NAME=VALUE,...: a second tracked device in part A
 * whose daemon gets these variables, reported as variant/tracked),
 * BLKSNAP_BENCH_STORAGE (loop, the default: a loop device over a sparse tmpfs
 * file, as dm-snapshot's COW device, which the daemon uses with O_DIRECT unless
 * BLKSNAP_STORAGE_DIRECT=0; tmpfile: an unnamed file in a tmpfs
 * directory, whose buffered reads io_uring hands to io-wq), BLKSNAP_DAEMON_ARGS (passed to the daemon the CLI starts).
 */
import { partD, type PartDResult, tableD } from "./backup_bench.ts";

const ROOT = new URL("../", import.meta.url).pathname;
const RUNTIME_S = Number(Deno.env.get("BLKSNAP_BENCH_RUNTIME") ?? "6");
/** Stacks alternate this many times per line; medians are reported. */
const REPEATS = Number(Deno.env.get("BLKSNAP_BENCH_REPEATS") ?? "3");
const PARTS = (Deno.env.get("BLKSNAP_BENCH_PARTS") ?? "ABCD").toUpperCase();
/** Part A runs only the workloads whose names match (e.g. "4k"; default: all). */
const ONLY_A = new RegExp(Deno.env.get("BLKSNAP_BENCH_ONLY_A") ?? "");
/**
 * Part A also runs a "variant" tracked device, served by a second daemon whose
 * environment adds these NAME=VALUE pairs (comma-separated, e.g.
 * "BLKSNAP_FIXED_BUFFERS=0"), over a loop device of its own: the effect of a
 * setting, measured in the same run against "tracked" (variant/tracked).
 */
const VARIANT_ENV: Record<string, string> = Object.fromEntries(
  (Deno.env.get("BLKSNAP_BENCH_VARIANT") ?? "").split(",").filter((kv) => kv.includes("=")).map(
    (kv) => [kv.slice(0, kv.indexOf("=")), kv.slice(kv.indexOf("=") + 1)],
  ),
);
const VARIANT = Object.keys(VARIANT_ENV).length > 0;
const VARIANT_SOCKET = "/run/blksnap-bench-variant.sock";
const SIZE_MIB = 1024;
const SIZE = SIZE_MIB << 20;
const CHUNK = 256 << 10;
const CHUNKS = SIZE / CHUNK;
/**
 * Each measured run of 4k first writes gets at most this many fresh random
 * chunks (of 4096); before the snapshot reads, exactly READ_MIX_CHUNKS random
 * chunks are copied (an unmeasured top-up), so the reads mix the original and
 * the difference storage alike on both stacks.
 */
const FIRST_4K_CHUNKS = 512;
const READ_MIX_CHUNKS = 1024;
/**
 * 1M first writes: right after the take to [0, 128M), after the storage's
 * first growth to [128M, 480M). Our storage grows by diff_storage_minimum
 * (1 GiB) and starts the next growth when less than half of it is left, so
 * these stay clear of the second growth.
 */
const FIRST_1M_A = [0, 128 << 20] as const;
const FIRST_1M_B = [128 << 20, 480 << 20] as const;
/** Rewrites go to this region at the start of the device, copied by a fill first. */
const REWRITE_BYTES = 128 << 20;
const WORK = "/tmp/bench";
const DIFF_DIR = `${WORK}/diff`;
/** Our difference storage: "tmpfile" (a directory on tmpfs) or "loop" (a block device). */
const STORAGE = Deno.env.get("BLKSNAP_BENCH_STORAGE") ?? "loop";
if (STORAGE !== "tmpfile" && STORAGE !== "loop") {
  throw new Error(`BLKSNAP_BENCH_STORAGE must be tmpfile or loop, not ${STORAGE}`);
}
const SOCKET = "/run/blksnap-bench.sock";
const DAEMON_LOG = "/run/daemon.log";
const UBLK_REF = "/usr/local/bin/ublk-ref";
const FIO_TIMEOUT_MS = (RUNTIME_S + 120) * 1000;
const CLI_TIMEOUT_MS = 180_000;

// ---------------------------------------------------------------------------
// running things

class CommandError extends Error {}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

function procInfo(pid: number): string {
  const read = (f: string) => {
    try {
      return Deno.readTextFileSync(`/proc/${pid}/${f}`).trim();
    } catch (e) {
      return `(${e instanceof Error ? e.message : e})`;
    }
  };
  const threads: string[] = [];
  try {
    for (const t of Deno.readDirSync(`/proc/${pid}/task`)) {
      threads.push(
        `  thread ${t.name} wchan=${read(`task/${t.name}/wchan`)}\n${
          read(`task/${t.name}/stack`).split("\n").map((l) => `    ${l}`).join("\n")
        }`,
      );
    }
  } catch { /* gone */ }
  return `pid ${pid} state: ${read("stat").split(" ")[2]}\n${threads.join("\n")}`;
}

/** Runs a program, requires status 0, returns trimmed stdout; kills it after timeoutMs. */
async function run(
  cmd: string,
  args: string[],
  opts: { env?: Record<string, string>; timeoutMs?: number } = {},
): Promise<string> {
  const child = new Deno.Command(cmd, {
    args,
    env: opts.env ?? {},
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const output = child.output();
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timedOut = new Promise<"timeout">((r) => {
    timer = setTimeout(() => r("timeout"), opts.timeoutMs ?? CLI_TIMEOUT_MS);
  });
  const first = await Promise.race([output, timedOut]);
  clearTimeout(timer);
  const what = `${cmd.split("/").pop()} ${args.join(" ")}`;
  if (first === "timeout") {
    const info = procInfo(child.pid);
    try {
      child.kill("SIGKILL");
    } catch { /* exited meanwhile */ }
    const second = await Promise.race([output, sleep(15_000).then(() => "hung" as const)]);
    throw new CommandError(
      `${what}: no exit after ${(opts.timeoutMs ?? CLI_TIMEOUT_MS) / 1000} s` +
        (second === "hung"
          ? "; still there 15 s after SIGKILL (stuck in the kernel)"
          : "; killed") +
        `\n${info}`,
    );
  }
  const dec = new TextDecoder();
  if (first.code !== 0) {
    throw new CommandError(
      `${what} exited ${first.code}: ${dec.decode(first.stderr).trim()} ${
        dec.decode(first.stdout).trim()
      }`.trim(),
    );
  }
  return dec.decode(first.stdout).trim();
}

const blksnap = (...args: string[]) =>
  run(Deno.execPath(), ["run", "-A", "--quiet", `${ROOT}main.ts`, ...args], {
    env: { BLKSNAP_SOCKET: SOCKET },
  });

/** The CLI of the variant daemon (BLKSNAP_BENCH_VARIANT). */
const blksnapVariant = (...args: string[]) =>
  run(Deno.execPath(), ["run", "-A", "--quiet", `${ROOT}main.ts`, ...args], {
    env: { ...VARIANT_ENV, BLKSNAP_SOCKET: VARIANT_SOCKET },
  });

// ---------------------------------------------------------------------------
// fio

interface Job {
  name: string;
  rw: string;
  bs: string;
  /** Run RUNTIME_S seconds, wrapping around (default); else one pass, at most RUNTIME_S. */
  timeBased?: boolean;
  /** Replay these byte offsets (writes of bs) in this order instead of rw. */
  offsets?: number[];
  /** Only the first `size` bytes of the device (from `offset`). */
  size?: number;
  offset?: number;
  /** No runtime limit (only with offsets or timeBased false). */
  unlimited?: boolean;
  /** Seconds, instead of RUNTIME_S. */
  runtime?: number;
}

interface Measurement {
  iops: number;
  mbPerS: number;
  /** Guest CPU time (all CPUs, busy jiffies) per I/O, in microseconds. */
  cpuUsPerIo: number;
  ios: number;
  seconds: number;
  /** Completion latency: mean, 99th percentile and maximum, in milliseconds. */
  latMs: { mean: number; p99: number; max: number };
}

/** Busy jiffies of all CPUs (USER_HZ = 100). */
function cpuBusy(): number {
  const f = Deno.readTextFileSync("/proc/stat").split("\n")[0]!.trim().split(/\s+/).slice(1).map(
    Number,
  );
  return f.slice(0, 8).reduce((a, b) => a + b, 0) - f[3]! - f[4]!;
}

const JOBS = {
  randRead: { name: "4k random read", rw: "randread", bs: "4k" },
  randWrite: { name: "4k random write", rw: "randwrite", bs: "4k" },
  seqRead: { name: "1M sequential read", rw: "read", bs: "1M" },
  seqWrite: { name: "1M sequential write", rw: "write", bs: "1M" },
} satisfies Record<string, Job>;

async function fio(device: string, job: Job): Promise<Measurement> {
  const common = [
    "--name=bench",
    "--ioengine=io_uring",
    "--direct=1",
    "--iodepth=32",
    ...(job.unlimited ? [] : [`--runtime=${job.runtime ?? RUNTIME_S}`]),
    "--output-format=json",
  ];
  let args: string[];
  if (job.offsets) {
    // fio turns its random map off with blockalign=, so a permutation of
    // chunk-aligned offsets (each chunk once) is replayed from an I/O log.
    const log = `${WORK}/replay.iolog`;
    const bytes = job.bs === "4k" ? 4096 : 1 << 20;
    await Deno.writeTextFile(
      log,
      `fio version 2 iolog\n${device} add\n${device} open\n` +
        job.offsets.map((o) => `${device} write ${o} ${bytes}\n`).join("") +
        `${device} close\n`,
    );
    args = [...common, `--read_iolog=${log}`, "--replay_no_stall=1"];
  } else {
    args = [
      ...common,
      `--filename=${device}`,
      `--rw=${job.rw}`,
      `--bs=${job.bs}`,
      "--norandommap",
      "--randrepeat=0",
      ...(job.size ? [`--size=${job.size}`] : []),
      ...(job.offset ? [`--offset=${job.offset}`] : []),
      ...(job.timeBased === false ? [] : ["--time_based"]),
    ];
  }
  const before = cpuBusy();
  const out = await run("fio", args, { timeoutMs: FIO_TIMEOUT_MS });
  const after = cpuBusy();
  const j = JSON.parse(out.slice(out.indexOf("{"))).jobs[0];
  if (j.error) throw new CommandError(`fio on ${device} (${job.name}): error ${j.error}`);
  const side = job.offsets || job.rw.includes("write") ? j.write : j.read;
  const ios = side.total_ios as number;
  const clat = side.clat_ns ?? {};
  const ms = (ns: number | undefined) => Number(((ns ?? 0) / 1e6).toFixed(2));
  return {
    iops: side.iops,
    mbPerS: side.bw_bytes / 1e6,
    cpuUsPerIo: ((after - before) * 10_000) / Math.max(1, ios),
    ios,
    seconds: side.runtime / 1000,
    latMs: { mean: ms(clat.mean), p99: ms(clat.percentile?.["99.000000"]), max: ms(clat.max) },
  };
}

/** One unmeasured sequential 1M write pass over the device (or its first `size` bytes). */
async function fill(device: string, size?: number): Promise<void> {
  await run("fio", [
    "--name=fill",
    `--filename=${device}`,
    "--ioengine=io_uring",
    "--direct=1",
    "--iodepth=16",
    "--rw=write",
    "--bs=1M",
    size ? `--size=${size}` : "--size=100%",
  ], { timeoutMs: 600_000 });
}

// ---------------------------------------------------------------------------
// bookkeeping

const median = (xs: number[]) => [...xs].sort((x, y) => x - y)[Math.floor(xs.length / 2)];
/** Per stack, the measurements of the repeats. */
type Samples = Record<string, Measurement[]>;

interface Line {
  workload: string;
  /** Median IOPS etc. per stack (the run with the median IOPS). */
  stacks: Record<string, Measurement>;
  /** Median over the repeats of the per-repeat ratio, by ratio name. */
  ratios: Record<string, number>;
  runs: Samples;
  /** Part A, tracked device: ublk requests per io_uring_enter of its queue loops. */
  requestsPerEnter?: number;
}

function medianRun(ms: Measurement[]): Measurement | undefined {
  const m = median(ms.map((x) => x.iops));
  return ms.find((x) => x.iops === m);
}

/** ratio name -> [numerator stack, denominator stack] */
function line(
  workload: string,
  runs: Samples,
  ratioDefs: Record<string, [string, string]>,
  requestsPerEnter?: number,
): Line {
  const stacks: Record<string, Measurement> = {};
  for (const [k, ms] of Object.entries(runs)) {
    const m = medianRun(ms);
    if (m) stacks[k] = m;
  }
  const ratios: Record<string, number> = {};
  for (const [name, [a, b]] of Object.entries(ratioDefs)) {
    const xs = runs[a] ?? [];
    const ys = runs[b] ?? [];
    const rs: number[] = [];
    // Pair the runs of one repeat (same index).
    for (let i = 0; i < Math.min(xs.length, ys.length); i++) rs.push(xs[i]!.iops / ys[i]!.iops);
    const m = median(rs);
    if (m !== undefined) ratios[name] = m;
  }
  return {
    workload,
    stacks,
    ratios,
    runs,
    ...(requestsPerEnter !== undefined ? { requestsPerEnter } : {}),
  };
}

interface Failure {
  section: string;
  message: string;
  daemonLogTail?: string;
  dmesgTail?: string;
}
const failures: Failure[] = [];

function tailOf(text: string, n: number): string {
  return text.trimEnd().split("\n").slice(-n).join("\n");
}

async function dmesgTail(n = 40): Promise<string> {
  try {
    return tailOf(await run("dmesg", [], { timeoutMs: 10_000 }), n);
  } catch (e) {
    return `(dmesg: ${e instanceof Error ? e.message : e})`;
  }
}

async function fail(section: string, err: unknown, ours: boolean): Promise<void> {
  const message = err instanceof Error ? err.message : String(err);
  const f: Failure = { section, message, dmesgTail: await dmesgTail() };
  if (ours) {
    try {
      f.daemonLogTail = tailOf(await Deno.readTextFile(DAEMON_LOG), 60);
    } catch (e) {
      f.daemonLogTail = `(${e instanceof Error ? e.message : e})`;
    }
  }
  failures.push(f);
  console.log(`\n!! ${section} FAILED: ${message}`);
  if (f.daemonLogTail) console.log(`   daemon log (tail):\n${indent(f.daemonLogTail)}`);
  console.log(`   dmesg (tail):\n${indent(f.dmesgTail ?? "")}\n`);
}

const indent = (s: string) => s.split("\n").map((l) => `     ${l}`).join("\n");

function fmt(m: Measurement): string {
  return `${m.iops.toFixed(0).padStart(6)} IOPS ${m.mbPerS.toFixed(0).padStart(5)} MB/s ${
    m.cpuUsPerIo.toFixed(0).padStart(5)
  } µs CPU/IO`;
}

const T0 = performance.now();
function stamp(): string {
  const s = Math.floor((performance.now() - T0) / 1000);
  return `[${String(Math.floor(s / 60)).padStart(2, "0")}:${String(s % 60).padStart(2, "0")}]`;
}

function logRun(what: string, stack: string, m: Measurement): void {
  console.log(
    `${stamp()} ${what.padEnd(27)} ${stack.padEnd(16)} ${
      fmt(m)
    }  (${m.ios} I/Os in ${m.seconds} s; ` +
      `latency ms mean ${m.latMs.mean} p99 ${m.latMs.p99} max ${m.latMs.max})`,
  );
}

/** The device's chunk-aligned offsets, shuffled. */
function chunkPermutation(): number[] {
  const idx = Array.from({ length: CHUNKS }, (_, i) => i);
  for (let i = idx.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [idx[i], idx[j]] = [idx[j]!, idx[i]!];
  }
  return idx.map((c) => c * CHUNK);
}

// ---------------------------------------------------------------------------
// devices

async function makeLoop(name: string, sparse: boolean): Promise<{ dev: string; file: string }> {
  const file = `${WORK}/${name}.img`;
  await Deno.writeFile(file, new Uint8Array(0));
  await Deno.truncate(file, SIZE + (sparse ? 16 << 20 : 0));
  return { dev: await run("losetup", ["--find", "--show", file]), file };
}

async function dmCreate(name: string, table: string): Promise<string> {
  await run("dmsetup", ["create", name, "--table", table]);
  // No udev in the VM: use devtmpfs's /dev/dm-N rather than /dev/mapper.
  const minor = await run("dmsetup", ["info", "-c", "--noheadings", "-o", "minor", name]);
  return `/dev/dm-${minor.trim()}`;
}

async function waitForNode(path: string): Promise<void> {
  for (let i = 0; i < 200; i++) {
    try {
      await Deno.stat(path);
      return;
    } catch {
      await sleep(25);
    }
  }
  throw new Error(`${path} did not appear`);
}

class UblkRef {
  private constructor(readonly child: Deno.ChildProcess, readonly dev: string) {}

  static async start(backing: string): Promise<UblkRef> {
    const child = new Deno.Command(UBLK_REF, {
      args: [backing, "2", "128"],
      stdin: "null",
      stdout: "piped",
      stderr: "inherit",
    }).spawn();
    const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
    let text = "";
    const deadline = Date.now() + 30_000;
    while (!text.includes("\n")) {
      const r = await Promise.race([
        reader.read(),
        sleep(Math.max(0, deadline - Date.now())).then(() => "timeout" as const),
      ]);
      if (r === "timeout") {
        child.kill("SIGKILL");
        throw new Error("ublk-ref printed no device in 30 s");
      }
      if (r.done) throw new Error(`ublk-ref exited: ${(await child.status).code}`);
      text += r.value;
    }
    const dev = text.split("\n")[0]!.trim();
    await waitForNode(dev);
    return new UblkRef(child, dev);
  }

  async stop(): Promise<void> {
    try {
      this.child.kill("SIGTERM");
    } catch { /* gone */ }
    const s = await Promise.race([this.child.status, sleep(30_000).then(() => null)]);
    if (!s) throw new Error(`ublk-ref did not exit on SIGTERM\n${procInfo(this.child.pid)}`);
  }
}

// ---------------------------------------------------------------------------
// snapshot stacks: ours and dm-snapshot, behind one interface

interface SnapStack {
  label: string;
  /** The device written without a snapshot (tracked / dm-linear). */
  base: string;
  baseLabel: string;
  /** The device written with the snapshot held (tracked / snapshot-origin). */
  writeDev(): string;
  writeLabel: string;
  /** The device that reads the snapshot (our image / dm snapshot). */
  snapDev(): string;
  snapLabel: string;
  create(): Promise<void>;
  /** Snapshot health after writes: throws when it is corrupted/invalid. */
  check(what: string): Promise<string>;
  /**
   * Waits until the storage has grown and holds `bytes` of copied chunks
   * (ours: the first growth; dm-snapshot has a fixed COW device). Returns the seconds waited.
   */
  settle(bytes: number): Promise<number>;
  destroy(): Promise<void>;
  ours: boolean;
}

interface SnapshotStatusJson {
  snapshots?: Array<
    {
      id: string;
      errorCode: number;
      storage: {
        filledBytes: number;
        capacityBytes: number;
        path: string;
        kind: string;
        io?: string;
      };
    }
  >;
}

function oursStack(loop: string, tracked: string, storage: string): SnapStack {
  let id: string | undefined;
  let image: string | undefined;
  return {
    label: "ours",
    ours: true,
    base: tracked,
    baseLabel: "tracked",
    writeDev: () => tracked,
    writeLabel: "tracked+snap",
    snapDev: () => image!,
    snapLabel: "image",
    async create() {
      id = await blksnap(
        "snapshot_create",
        "--device",
        loop,
        "--file",
        storage,
        "--limit",
        "2G",
      );
      const take = JSON.parse(await blksnap("snapshot_take", "--id", id, "--json"));
      image = take.images[0].image as string;
      await waitForNode(image);
    },
    async check(what: string) {
      const st = JSON.parse(await blksnap("status", "--json")) as SnapshotStatusJson;
      const s = st.snapshots?.find((x) => x.id === id);
      if (!s) throw new Error(`${what}: snapshot ${id} missing from status`);
      if (s.errorCode !== 0) {
        throw new Error(`${what}: snapshot ${id} has error code ${s.errorCode}`);
      }
      return `diff storage ${
        (s.storage.filledBytes / 2 ** 20).toFixed(0)
      } MiB filled (${s.storage.kind}${s.storage.io ? `, ${s.storage.io} I/O` : ""}, capacity ${
        (s.storage.capacityBytes / 2 ** 20).toFixed(0)
      } MiB)`;
    },
    async settle(bytes: number) {
      const t = performance.now();
      for (;;) {
        const st = JSON.parse(await blksnap("status", "--json")) as SnapshotStatusJson;
        const s = st.snapshots?.find((x) => x.id === id);
        if (!s) throw new Error(`snapshot ${id} missing from status`);
        if (s.errorCode !== 0) throw new Error(`snapshot ${id} has error code ${s.errorCode}`);
        if (s.storage.capacityBytes > 0 && s.storage.filledBytes >= bytes) break;
        if (performance.now() - t > 120_000) {
          throw new Error(
            `the difference storage did not grow/fill in 120 s: ${JSON.stringify(s.storage)}`,
          );
        }
        await sleep(500);
      }
      return (performance.now() - t) / 1000;
    },
    async destroy() {
      if (id) await blksnap("snapshot_destroy", "--id", id);
      id = undefined;
      image = undefined;
    },
  };
}

function dmStack(
  twin: string,
  cow: { dev: string; file: string },
  linear: string,
  origin: string,
): SnapStack {
  const sectors = SIZE / 512;
  let snap: string | undefined;
  return {
    label: "dm",
    ours: false,
    base: linear,
    baseLabel: "dm-linear",
    writeDev: () => origin,
    writeLabel: "dm-snap origin",
    snapDev: () => snap!,
    snapLabel: "dm-snap snapshot",
    async create() {
      // As LVM does: no writes in flight through the origin while the snapshot comes.
      await run("dmsetup", ["suspend", "bench-origin"]);
      try {
        snap = await dmCreate(
          "bench-snap",
          `0 ${sectors} snapshot ${twin} ${cow.dev} N ${CHUNK / 512}`,
        );
      } finally {
        await run("dmsetup", ["resume", "bench-origin"]);
      }
    },
    async check(what: string) {
      const st = await run("dmsetup", ["status", "bench-snap"]);
      if (/Invalid|Overflow/.test(st)) throw new Error(`${what}: dm-snapshot ${st}`);
      const m = st.match(/snapshot (\d+)\/(\d+)/);
      return m
        ? `COW ${(Number(m[1]) / 2048).toFixed(0)} MiB used of ${(Number(m[2]) / 2048).toFixed(0)}`
        : st;
    },
    settle: () => Promise.resolve(0),
    async destroy() {
      if (!snap) return;
      await run("dmsetup", ["suspend", "bench-origin"]);
      try {
        await run("dmsetup", ["remove", "bench-snap"]);
      } finally {
        await run("dmsetup", ["resume", "bench-origin"]);
      }
      snap = undefined;
      // Give the COW space back to tmpfs.
      await run("fallocate", ["--punch-hole", "--offset", "0", "--length", String(SIZE), cow.file]);
    },
  };
}

/** Per workload line of part B/C: samples by stack name. */
type SnapSamples = Record<string, Samples>;

const B_LINES = [
  "4k random first writes, right after the take",
  "4k random first writes, storage grown",
  "4k random rewrites",
  "1M sequential first writes, right after the take",
  "1M sequential first writes, storage grown",
  "1M sequential rewrites",
] as const;
const C_LINES = ["1M sequential read", "4k random read"] as const;

function push(into: SnapSamples, workload: string, stack: string, m: Measurement): void {
  ((into[workload] ??= {})[stack] ??= []).push(m);
}

/**
 * One repeat of parts B and C on one stack: write baselines, then snapshot 1
 * (4k first writes right after the take, and after the storage's first growth;
 * reads of the snapshot with READ_MIX_CHUNKS copied; 4k rewrites), then
 * snapshot 2 (1M first writes right after the take and after the growth; 1M
 * rewrites).
 */
async function snapshotRepeat(
  s: SnapStack,
  b: SnapSamples,
  c: SnapSamples,
  perm: number[],
  notes: string[],
): Promise<void> {
  const tag = (x: string) => `${s.label}:${x}`;
  // Baselines over the regions the snapshot runs write: the whole device
  // (first writes) and the first REWRITE_BYTES (rewrites): under TCG a
  // smaller working set alone runs faster.
  const m1 = await fio(s.base, JOBS.randWrite);
  logRun("4k random write", s.baseLabel, m1);
  const m2 = await fio(s.base, JOBS.seqWrite);
  logRun("1M sequential write", s.baseLabel, m2);
  const m3 = await fio(s.base, { ...JOBS.randWrite, size: REWRITE_BYTES });
  logRun(`4k random write ${REWRITE_BYTES >> 20} MiB`, s.baseLabel, m3);
  const m4 = await fio(s.base, { ...JOBS.seqWrite, size: REWRITE_BYTES });
  logRun(`1M sequential write ${REWRITE_BYTES >> 20} MiB`, s.baseLabel, m4);
  [m1, m1, m3, m2, m2, m4].forEach((m, i) => push(b, B_LINES[i]!, tag("base"), m));
  const replay = (offsets: number[], unlimited = false): Job => ({
    name: "4k first writes",
    rw: "randwrite",
    bs: "4k",
    offsets,
    unlimited,
  });

  // Snapshot 1: 4k first writes, reads of a partly copied snapshot, 4k rewrites.
  await s.create();
  try {
    // The replay issues in order and completes all it issued: chunks perm[0, ios) are copied.
    const a = await fio(s.writeDev(), replay(perm.slice(0, FIRST_4K_CHUNKS)));
    logRun("4k first writes, after take", s.writeLabel, a);
    push(b, B_LINES[0], tag("snap"), a);
    const waited = await s.settle(a.ios * CHUNK);
    const bb = await fio(s.writeDev(), replay(perm.slice(a.ios, a.ios + FIRST_4K_CHUNKS)));
    logRun("4k first writes, grown", s.writeLabel, bb);
    push(b, B_LINES[1], tag("snap"), bb);
    const done = a.ios + bb.ios;
    if (done < READ_MIX_CHUNKS) {
      await fio(s.writeDev(), replay(perm.slice(done, READ_MIX_CHUNKS), true));
    }
    const state = await s.check("after 4k first writes");
    notes.push(
      `${s.label}: 4k first writes: ${a.ios} chunks right after the take in ${a.seconds} s` +
        (s.ours
          ? `, then ${waited.toFixed(1)} s until the storage had grown and stored them`
          : "") +
        `, ${bb.ios} more in ${bb.seconds} s; at the reads ${state}`,
    );
    // The image's queue workers are new: warm them (and the other side alike).
    await fio(s.snapDev(), { name: "warm-up", rw: "randread", bs: "64k", runtime: 2 });
    for (const job of [JOBS.seqRead, JOBS.randRead]) {
      const own = await fio(s.writeDev(), job);
      logRun(job.name, s.writeLabel, own);
      const snap = await fio(s.snapDev(), job);
      logRun(job.name, s.snapLabel, snap);
      push(c, job.name, tag("dev"), own);
      push(c, job.name, tag("snap"), snap);
    }
    await fill(s.writeDev(), REWRITE_BYTES);
    const re = await fio(s.writeDev(), { ...JOBS.randWrite, size: REWRITE_BYTES });
    logRun("4k random rewrites", s.writeLabel, re);
    push(b, B_LINES[2], tag("snap"), re);
    notes.push(`${s.label}: after 4k rewrites ${await s.check("after 4k rewrites")}`);
  } finally {
    await s.destroy();
  }

  // Snapshot 2: 1M first writes, then rewrites.
  await s.create();
  try {
    const [a0, a1] = FIRST_1M_A;
    const a = await fio(s.writeDev(), {
      ...JOBS.seqWrite,
      timeBased: false,
      offset: a0,
      size: a1 - a0,
    });
    logRun("1M first writes, after take", s.writeLabel, a);
    push(b, B_LINES[3], tag("snap"), a);
    const waited = await s.settle(a.ios << 20);
    const [b0, b1] = FIRST_1M_B;
    const bb = await fio(s.writeDev(), {
      ...JOBS.seqWrite,
      timeBased: false,
      offset: b0,
      size: b1 - b0,
    });
    logRun("1M first writes, grown", s.writeLabel, bb);
    push(b, B_LINES[4], tag("snap"), bb);
    notes.push(
      `${s.label}: 1M first writes: ${a.ios} MiB right after the take in ${a.seconds} s` +
        (s.ours
          ? `, then ${waited.toFixed(1)} s until the storage had grown and stored them`
          : "") +
        `, ${bb.ios} MiB more in ${bb.seconds} s; ${await s.check("after 1M first writes")}`,
    );
    await fill(s.writeDev(), REWRITE_BYTES);
    const re = await fio(s.writeDev(), { ...JOBS.seqWrite, size: REWRITE_BYTES });
    logRun("1M sequential rewrites", s.writeLabel, re);
    push(b, B_LINES[5], tag("snap"), re);
    await s.check("after 1M rewrites");
  } finally {
    await s.destroy();
  }
}

// ---------------------------------------------------------------------------
// tables

function cell(m: Measurement | undefined, workload: string): string {
  if (!m) return "—";
  return workload.startsWith("1M") ? `${m.mbPerS.toFixed(0)} MB/s` : m.iops.toFixed(0);
}
const r2 = (x: number | undefined) => (x === undefined ? "—" : x.toFixed(2));
const cpu = (l: Line, ks: string[]) =>
  ks.map((k) => (l.stacks[k] ? l.stacks[k]!.cpuUsPerIo.toFixed(0) : "—")).join(" / ");

/** The largest completion latency over the repeats, in ms. */
function maxLat(l: Line, k: string): string {
  const ms = l.runs[k];
  return ms?.length ? Math.max(...ms.map((m) => m.latMs.max)).toFixed(0) : "—";
}

function tableA(lines: Line[], refNote: string): string {
  return [
    `A. No snapshot: IOPS (MB/s for 1M), ratios = medians of per-repeat ratios${refNote}`,
    "",
    "| workload | raw | dm-linear | ublk-ref | tracked | tracked/ublk-ref (≥0.9) | tracked/raw | dm-linear/raw | ublk-ref/raw | CPU µs/IO raw / dm-linear / ublk-ref / tracked | reqs per enter |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ...lines.map((l) =>
      `| ${l.workload} | ${cell(l.stacks.raw, l.workload)} | ${
        cell(l.stacks["dm-linear"], l.workload)
      } | ${cell(l.stacks["ublk-ref"], l.workload)} | ${cell(l.stacks.tracked, l.workload)} | ${
        r2(l.ratios["tracked/ublk-ref"])
      } | ${r2(l.ratios["tracked/raw"])} | ${r2(l.ratios["dm-linear/raw"])} | ${
        r2(l.ratios["ublk-ref/raw"])
      } | ${cpu(l, ["raw", "dm-linear", "ublk-ref", "tracked"])} | ${
        l.requestsPerEnter?.toFixed(2) ?? "—"
      } |`
    ),
  ].join("\n");
}

function tableB(lines: Line[]): string {
  return [
    "B. Writes with a snapshot held (256 KiB chunks): ours = tracked device with a blksnap snapshot vs the tracked device without;",
    "   dm = dm-snapshot origin (transient store, COW on a loop device) vs dm-linear. First writes each hit a never-copied",
    `   chunk (4k: up to ${FIRST_4K_CHUNKS} random chunk-aligned offsets replayed per run; 1M: one sequential pass over ${
      (FIRST_1M_A[1] - FIRST_1M_A[0]) >> 20
    } / ${
      (FIRST_1M_B[1] - FIRST_1M_B[0]) >> 20
    } MiB), at most ${RUNTIME_S} s; "right after the take" includes`,
    '   our storage\'s first growth (diff_storage_minimum, 1 GiB fallocate), "storage grown" starts once it is done.',
    `   Rewrites: the first ${
      REWRITE_BYTES >> 20
    } MiB, all copied. No-snapshot baselines: the whole device for first writes,`,
    `   the same ${REWRITE_BYTES >> 20} MiB for rewrites.`,
    "",
    "| workload | tracked, no snapshot | tracked + snapshot | ours: snap/no-snap | dm-linear | dm-snapshot origin | dm: snap/linear | ours ÷ dm (≥1) | CPU µs/IO tracked / +snap / dm-linear / dm-snap | max latency ms +snap / dm-snap |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ...lines.map((l) => {
      const o = l.ratios.ours;
      const d = l.ratios.dm;
      return `| ${l.workload} | ${cell(l.stacks["ours:base"], l.workload)} | ${
        cell(l.stacks["ours:snap"], l.workload)
      } | ${r2(o)} | ${cell(l.stacks["dm:base"], l.workload)} | ${
        cell(l.stacks["dm:snap"], l.workload)
      } | ${r2(d)} | ${o !== undefined && d !== undefined ? r2(o / d) : "—"} | ${
        cpu(l, ["ours:base", "ours:snap", "dm:base", "dm:snap"])
      } | ${maxLat(l, "ours:snap")} / ${maxLat(l, "dm:snap")} |`;
    }),
  ].join("\n");
}

function tableC(lines: Line[]): string {
  return [
    `C. Snapshot reads, ${READ_MIX_CHUNKS} of ${CHUNKS} chunks (at random) copied to the difference storage / COW device;`,
    "   ours: the snapshot image vs the tracked device; dm: the snapshot device vs the snapshot-origin device",
    "",
    "| workload | tracked (snapshot held) | our image | image/tracked (≥0.9) | dm-snapshot origin | dm snapshot | dm: snapshot/origin | CPU µs/IO tracked / image / dm-origin / dm-snap |",
    "|---|---:|---:|---:|---:|---:|---:|---:|",
    ...lines.map((l) =>
      `| ${l.workload} | ${cell(l.stacks["ours:dev"], l.workload)} | ${
        cell(l.stacks["ours:snap"], l.workload)
      } | ${r2(l.ratios.ours)} | ${cell(l.stacks["dm:dev"], l.workload)} | ${
        cell(l.stacks["dm:snap"], l.workload)
      } | ${r2(l.ratios.dm)} | ${cpu(l, ["ours:dev", "ours:snap", "dm:dev", "dm:snap"])} |`
    ),
  ].join("\n");
}

// ---------------------------------------------------------------------------

async function warmUp(dev: string): Promise<void> {
  await fio(dev, { name: "warm-up", rw: "randrw", bs: "4k" });
  await fio(dev, { name: "warm-up", rw: "rw", bs: "1M" });
}

async function queueTotals(): Promise<{ requests: number; enters: number }> {
  const st = JSON.parse(await blksnap("status", "--json"));
  let requests = 0;
  let enters = 0;
  for (const d of st.devices) {
    for (const q of d.queueStats) {
      requests += q.requests;
      enters += q.enters;
    }
  }
  return { requests, enters };
}

async function main(): Promise<number> {
  const t0 = performance.now();
  const bootUptime = Number((await Deno.readTextFile("/proc/uptime")).split(" ")[0]);
  await Deno.mkdir(WORK, { recursive: true });
  // Its own tmpfs: /tmp (half the RAM) cannot hold two 1 GiB devices plus the
  // copied chunks. Mounted before the daemon starts, so its namespace has it.
  await run("mount", ["-t", "tmpfs", "-o", "size=5G,mode=0755", "tmpfs", WORK]);
  await Deno.mkdir(DIFF_DIR);
  const loop = await makeLoop("disk", false);
  const twin = await makeLoop("twin", false);
  const cow = await makeLoop("cow", true);
  const storageLoop = STORAGE === "loop" ? await makeLoop("storage", true) : undefined;
  // Fill the devices so reads hit real pages, not tmpfs holes.
  for (const d of [loop.dev, twin.dev]) await fill(d);
  const sectors = SIZE / 512;
  const dmLinear = await dmCreate("bench-linear", `0 ${sectors} linear ${twin.dev} 0`);
  const dmOrigin = await dmCreate("bench-origin", `0 ${sectors} snapshot-origin ${twin.dev}`);

  const linesA: Line[] = [];
  const linesB: Line[] = [];
  const linesC: Line[] = [];
  const notes: string[] = [];
  let refNote = "";
  let ref: UblkRef | undefined;
  let backupD: PartDResult | undefined;
  const tracked = await blksnap("attach", "--device", loop.dev);
  console.log(
    `stacks: raw ${loop.dev}, tracked ${tracked} over it; dm-linear ${dmLinear}, dm-snapshot origin ${dmOrigin} over ${twin.dev}; COW ${cow.dev}; our storage ${
      storageLoop?.dev ?? `a tmpfile in ${DIFF_DIR}`
    }`,
  );
  try {
    // Warm up: the queue workers' JIT and the page cache, outside the measurements.
    await warmUp(tracked);
    await warmUp(dmLinear);
    // ---- A
    if (PARTS.includes("A")) {
      try {
        await Deno.stat(UBLK_REF);
        ref = await UblkRef.start(twin.dev);
        console.log(`ublk-ref: ${ref.dev} over ${twin.dev}`);
      } catch (e) {
        refNote = `; ublk-ref: not available (${e instanceof Error ? e.message : e})`;
        console.log(`ublk-ref: not available (${e instanceof Error ? e.message : e})`);
      }
      let variant: { loop: { dev: string; file: string }; tracked: string } | undefined;
      if (VARIANT) {
        const vloop = await makeLoop("variant", false);
        await fill(vloop.dev);
        variant = { loop: vloop, tracked: await blksnapVariant("attach", "--device", vloop.dev) };
        console.log(
          `variant: ${variant.tracked} over ${vloop.dev}, env ${JSON.stringify(VARIANT_ENV)}`,
        );
        await warmUp(variant.tracked);
      }
      const stacks: Array<[string, string]> = [
        ["raw", loop.dev],
        ["dm-linear", dmLinear],
        ...(ref ? [["ublk-ref", ref.dev] as [string, string]] : []),
        ["tracked", tracked],
        ...(variant ? [["variant", variant.tracked] as [string, string]] : []),
      ];
      if (ref) await warmUp(ref.dev);
      const workloads = [JOBS.randRead, JOBS.randWrite, JOBS.seqRead, JOBS.seqWrite];
      for (const w of workloads.filter((w) => ONLY_A.test(w.name))) {
        const runs: Samples = {};
        const before = await queueTotals();
        const failed = new Set<string>();
        for (let i = 0; i < REPEATS; i++) {
          // Alternate the stacks so drift of the host hits all alike.
          for (const [name, dev] of stacks) {
            if (failed.has(name)) continue;
            try {
              const m = await fio(dev, w);
              (runs[name] ??= []).push(m);
              logRun(w.name, name, m);
            } catch (e) {
              failed.add(name);
              await fail(`A ${w.name} on ${name}`, e, name === "tracked");
            }
          }
        }
        const after = await queueTotals();
        linesA.push(line(
          w.name,
          runs,
          {
            "tracked/ublk-ref": ["tracked", "ublk-ref"],
            "tracked/raw": ["tracked", "raw"],
            "dm-linear/raw": ["dm-linear", "raw"],
            "ublk-ref/raw": ["ublk-ref", "raw"],
            "variant/tracked": ["variant", "tracked"],
            "variant/ublk-ref": ["variant", "ublk-ref"],
          },
          (after.requests - before.requests) / Math.max(1, after.enters - before.enters),
        ));
      }
      if (ref) {
        await ref.stop().catch((e) => fail("stopping ublk-ref", e, false));
        ref = undefined;
      }
      if (variant) {
        await blksnapVariant("detach", "--device", variant.loop.dev).catch((e) =>
          fail("variant detach", e, false)
        );
        const st = JSON.parse(await blksnapVariant("status", "--json"));
        if (st.pid) Deno.kill(st.pid, "SIGTERM");
        await sleep(1000);
        await run("losetup", ["-d", variant.loop.dev]).catch(() => {});
        await Deno.remove(variant.loop.file).catch(() => {});
      }
    }

    // ---- B and C
    if (PARTS.includes("B") || PARTS.includes("C")) {
      const ours = oursStack(loop.dev, tracked, storageLoop?.dev ?? DIFF_DIR);
      const dm = dmStack(twin.dev, cow, dmLinear, dmOrigin);
      const b: SnapSamples = {};
      const c: SnapSamples = {};
      const broken = new Set<string>();
      for (let i = 0; i < REPEATS; i++) {
        // The same chunks for both stacks in one repeat.
        const perm = chunkPermutation();
        for (const s of [ours, dm]) {
          if (broken.has(s.label)) continue;
          console.log(`${stamp()} -- snapshot repeat ${i + 1}/${REPEATS}: ${s.label}`);
          try {
            await snapshotRepeat(s, b, c, perm, notes);
          } catch (e) {
            broken.add(s.label);
            await fail(
              `B/C ${s.label === "ours" ? "our snapshot" : "dm-snapshot"} (repeat ${i + 1})`,
              e,
              s.ours,
            );
            await s.destroy().catch((e2) => fail(`destroying the ${s.label} snapshot`, e2, s.ours));
          }
        }
      }
      const ratiosB = { ours: ["ours:snap", "ours:base"], dm: ["dm:snap", "dm:base"] } as Record<
        string,
        [string, string]
      >;
      for (const w of B_LINES) linesB.push(line(w, b[w] ?? {}, ratiosB));
      const ratiosC = { ours: ["ours:snap", "ours:dev"], dm: ["dm:snap", "dm:dev"] } as Record<
        string,
        [string, string]
      >;
      for (const w of C_LINES) linesC.push(line(w, c[w] ?? {}, ratiosC));
    }
    // ---- D (bench/backup_bench.ts)
    if (PARTS.includes("D")) {
      backupD = await partD({ blksnap, run, work: WORK }).catch((e) =>
        fail("D backup", e, true).then(() => undefined)
      );
    }
  } finally {
    if (ref) await ref.stop().catch((e) => fail("stopping ublk-ref", e, false));
    await blksnap("detach", "--device", loop.dev).catch((e) => fail("detach", e, true));
    try {
      const st = JSON.parse(await blksnap("status", "--json"));
      if (st.pid) Deno.kill(st.pid, "SIGTERM");
    } catch (e) {
      await fail("stopping the daemon", e, true);
    }
    for (const n of ["bench-snap", "bench-origin", "bench-linear"]) {
      await run("dmsetup", ["remove", n]).catch(() => {});
    }
    await sleep(1000);
    for (const d of [loop.dev, twin.dev, cow.dev, ...(storageLoop ? [storageLoop.dev] : [])]) {
      await run("losetup", ["-d", d]).catch(() => {});
    }
  }

  const header =
    `\nfio io_uring, direct, depth 32, ${RUNTIME_S} s per run (first writes: one pass, at most that), ` +
    `${REPEATS} alternating repeats per line (medians); ${SIZE_MIB} MiB loop devices on tmpfs; ` +
    `ublk-ref and the daemon 2 queues x 128; daemon args: ${
      Deno.env.get("BLKSNAP_DAEMON_ARGS") || "(defaults)"
    }; QEMU/TCG: only ratios mean anything\n`;
  console.log(header);
  if (linesA.length) console.log(tableA(linesA, refNote) + "\n");
  if (VARIANT && linesA.length) {
    console.log(
      `Variant (env ${
        JSON.stringify(VARIANT_ENV)
      }):\n\n| workload | tracked | variant | variant/tracked | variant/ublk-ref | CPU µs/IO tracked / variant |\n|---|---:|---:|---:|---:|---:|\n` +
        linesA.map((l) =>
          `| ${l.workload} | ${cell(l.stacks.tracked, l.workload)} | ${
            cell(l.stacks.variant, l.workload)
          } | ${r2(l.ratios["variant/tracked"])} | ${r2(l.ratios["variant/ublk-ref"])} | ${
            cpu(l, ["tracked", "variant"])
          } |`
        ).join("\n") + "\n",
    );
  }
  if (linesB.length) console.log(tableB(linesB) + "\n");
  if (linesC.length) console.log(tableC(linesC) + "\n");
  if (backupD) console.log(tableD(backupD) + "\n");
  if (notes.length) console.log(`notes:\n${notes.map((n) => `  ${n}`).join("\n")}\n`);
  // The kernel's messages since the benchmark started.
  const kernelWarnings = (await run("dmesg", [], { timeoutMs: 10_000 }).catch(() => ""))
    .split("\n").filter((l) => Number(l.match(/^\[\s*([\d.]+)\]/)?.[1] ?? 0) >= bootUptime);
  if (kernelWarnings.length) {
    console.log(
      `kernel messages during the benchmark:\n${indent(tailOf(kernelWarnings.join("\n"), 30))}\n`,
    );
  }
  if (failures.length) {
    console.log(`${failures.length} FAILURE(S):`);
    for (const f of failures) console.log(`  ${f.section}: ${f.message.split("\n")[0]}`);
  }
  const minutes = (performance.now() - t0) / 60_000;
  console.log(`bench took ${minutes.toFixed(1)} min`);

  const result = {
    date: new Date().toISOString(),
    kernel: (await Deno.readTextFile("/proc/version")).trim(),
    deno: Deno.version.deno,
    cpus: navigator.hardwareConcurrency,
    runtimeSeconds: RUNTIME_S,
    repeats: REPEATS,
    daemonArgs: Deno.env.get("BLKSNAP_DAEMON_ARGS") ?? "",
    deviceMiB: SIZE_MIB,
    chunkKiB: CHUNK >> 10,
    storage: STORAGE,
    minutes: Number(minutes.toFixed(2)),
    ublkRef: refNote ? refNote.replace(/^; /, "") : "built in",
    passthrough: linesA,
    snapshotWrites: linesB,
    snapshotReads: linesC,
    backup: backupD ?? null,
    notes,
    kernelMessages: kernelWarnings,
    failures,
  };
  const outDir = Deno.env.get("BLKSNAP_OUT_DIR") ?? `${ROOT}bench/results`;
  await Deno.mkdir(outDir, { recursive: true });
  const name = `bench-${result.date.replaceAll(":", "-").slice(0, 19)}.json`;
  await Deno.writeTextFile(`${outDir}/${name}`, JSON.stringify(result, null, 2) + "\n");
  if (failures.length) {
    await Deno.copyFile(DAEMON_LOG, `${outDir}/${name.replace(/\.json$/, ".daemon.log")}`).catch(
      () => {},
    );
  }
  console.log(`\nwrote ${outDir}/${name}`);
  return failures.length ? 1 : 0;
}

// Deno.exit: a child stuck in the kernel must not keep the benchmark alive.
if (import.meta.main) Deno.exit(await main());
