/**
 * Benchmark (deno task bench; runs inside the VM): fio on the raw loop device
 * and on the tracked device over it, in the same run, and the tracked/raw
 * ratio per workload. Prints a table and writes JSON to $BLKSNAP_OUT_DIR
 * (copied to bench/results/ on the host).
 *
 * Under TCG absolute numbers mean little; ratios measured in one run do.
 */
const ROOT = new URL("../", import.meta.url).pathname;
const RUNTIME_S = Number(Deno.env.get("BLKSNAP_BENCH_RUNTIME") ?? "8");
/** Raw and tracked alternate this many times per workload; the median ratio is reported. */
const REPEATS = Number(Deno.env.get("BLKSNAP_BENCH_REPEATS") ?? "3");
const SIZE_MIB = 1024;

interface Workload {
  name: string;
  rw: string;
  bs: string;
}

const WORKLOADS: Workload[] = [
  { name: "4k random read", rw: "randread", bs: "4k" },
  { name: "4k random write", rw: "randwrite", bs: "4k" },
  { name: "1M sequential read", rw: "read", bs: "1M" },
  { name: "1M sequential write", rw: "write", bs: "1M" },
];

interface Measurement {
  iops: number;
  mbPerS: number;
}

async function run(cmd: string, args: string[], env: Record<string, string> = {}): Promise<string> {
  const out = await new Deno.Command(cmd, { args, env, stdout: "piped", stderr: "piped" }).output();
  const dec = new TextDecoder();
  if (out.code !== 0) {
    throw new Error(`${cmd} ${args.join(" ")} exited ${out.code}: ${dec.decode(out.stderr)}`);
  }
  return dec.decode(out.stdout).trim();
}

async function fio(device: string, w: Workload): Promise<Measurement> {
  const out = await run("fio", [
    "--name=bench",
    `--filename=${device}`,
    "--ioengine=io_uring",
    "--direct=1",
    "--iodepth=32",
    `--rw=${w.rw}`,
    `--bs=${w.bs}`,
    "--time_based",
    `--runtime=${RUNTIME_S}`,
    "--ramp_time=2",
    "--norandommap",
    "--randrepeat=0",
    "--output-format=json",
  ]);
  const job = JSON.parse(out.slice(out.indexOf("{"))).jobs[0];
  const side = w.rw.includes("read") ? job.read : job.write;
  return { iops: side.iops, mbPerS: side.bw_bytes / 1e6 };
}

const blksnap = (...args: string[]) =>
  run(Deno.execPath(), ["run", "-A", "--quiet", `${ROOT}main.ts`, ...args], {
    BLKSNAP_SOCKET: "/run/blksnap-bench.sock",
  });

async function main() {
  await Deno.mkdir("/tmp/bench", { recursive: true });
  const file = "/tmp/bench/disk.img";
  await Deno.truncate(file, SIZE_MIB << 20).catch(async () => {
    await Deno.writeFile(file, new Uint8Array(0));
    await Deno.truncate(file, SIZE_MIB << 20);
  });
  const loop = await run("losetup", ["--find", "--show", file]);
  // Fill the device so reads hit real pages, not tmpfs holes.
  await run("fio", [
    "--name=fill",
    `--filename=${loop}`,
    "--ioengine=io_uring",
    "--direct=1",
    "--iodepth=16",
    "--rw=write",
    "--bs=1M",
    "--size=100%",
  ]);

  interface Row {
    workload: string;
    raw: Measurement;
    tracked: Measurement;
    /** Median of the tracked/raw IOPS ratios of the alternating runs. */
    ratio: number;
    ratios: number[];
    /** Batching of the queue loop: ublk requests per io_uring_enter. */
    requestsPerEnter: number;
  }
  const rows: Row[] = [];
  const tracked = await blksnap("attach", "--device", loop);
  try {
    for (const w of WORKLOADS) {
      // Alternate raw and tracked so drift of the host hits both alike.
      const pairs: Array<{ raw: Measurement; tr: Measurement; ratio: number }> = [];
      const before = await queueTotals();
      for (let i = 0; i < REPEATS; i++) {
        const raw = await fio(loop, w);
        const tr = await fio(tracked, w);
        const ratio = tr.iops / raw.iops;
        pairs.push({ raw, tr, ratio });
        console.log(
          `${w.name.padEnd(20)} raw ${fmt(raw)}  tracked ${fmt(tr)}  ratio ${ratio.toFixed(2)}`,
        );
      }
      const after = await queueTotals();
      pairs.sort((x, y) => x.ratio - y.ratio);
      const mid = pairs[Math.floor(pairs.length / 2)]!;
      rows.push({
        workload: w.name,
        raw: mid.raw,
        tracked: mid.tr,
        ratio: mid.ratio,
        ratios: pairs.map((p) => Number(p.ratio.toFixed(3))),
        requestsPerEnter: (after.requests - before.requests) /
          Math.max(1, after.enters - before.enters),
      });
    }
  } finally {
    await blksnap("detach", "--device", loop);
    const st = JSON.parse(await blksnap("status", "--json"));
    if (st.pid) Deno.kill(st.pid, "SIGTERM");
    await run("losetup", ["-d", loop]);
  }

  const table = [
    "| workload | raw IOPS | raw MB/s | tracked IOPS | tracked MB/s | tracked/raw (median) | all ratios | requests per enter |",
    "|---|---:|---:|---:|---:|---:|---|---:|",
    ...rows.map((r) =>
      `| ${r.workload} | ${r.raw.iops.toFixed(0)} | ${r.raw.mbPerS.toFixed(1)} | ${
        r.tracked.iops.toFixed(0)
      } | ` +
      `${r.tracked.mbPerS.toFixed(1)} | ${r.ratio.toFixed(2)} | ${r.ratios.join(" ")} | ${
        r.requestsPerEnter.toFixed(2)
      } |`
    ),
  ].join("\n");
  console.log(
    `\nfio io_uring, direct, depth 32, ${RUNTIME_S} s per run, ${REPEATS} alternating runs per line, ` +
      `${SIZE_MIB} MiB loop on tmpfs; daemon args: ${
        Deno.env.get("BLKSNAP_DAEMON_ARGS") || "(defaults)"
      }\n`,
  );
  console.log(table);

  const result = {
    date: new Date().toISOString(),
    kernel: (await Deno.readTextFile("/proc/version")).trim(),
    deno: Deno.version.deno,
    cpus: navigator.hardwareConcurrency,
    runtimeSeconds: RUNTIME_S,
    repeats: REPEATS,
    daemonArgs: Deno.env.get("BLKSNAP_DAEMON_ARGS") ?? "",
    deviceMiB: SIZE_MIB,
    rows,
  };
  const outDir = Deno.env.get("BLKSNAP_OUT_DIR") ?? `${ROOT}bench/results`;
  await Deno.mkdir(outDir, { recursive: true });
  const name = `tracked-vs-raw-${result.date.replaceAll(":", "-").slice(0, 19)}.json`;
  await Deno.writeTextFile(`${outDir}/${name}`, JSON.stringify(result, null, 2) + "\n");
  console.log(`\nwrote ${outDir}/${name}`);
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

function fmt(m: Measurement): string {
  return `${m.iops.toFixed(0).padStart(7)} IOPS ${m.mbPerS.toFixed(1).padStart(7)} MB/s`;
}

if (import.meta.main) await main();
