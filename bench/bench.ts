/**
 * Benchmark (deno task bench; runs inside the VM): fio on the raw loop device,
 * on the tracked device over it, and on dm-linear over a twin loop device (the
 * kernel's own stacking passthrough), alternating in the same run. Prints the
 * median IOPS ratios against raw and the guest CPU time per I/O (the VM is
 * CPU-bound under TCG, so CPU per I/O is the steadier figure), and writes
 * JSON to $BLKSNAP_OUT_DIR (copied to bench/results/ on the host).
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
  /** Guest CPU time (all CPUs, busy jiffies) per I/O, in microseconds. */
  cpuUsPerIo: number;
}

/** Busy and total jiffies of all CPUs (USER_HZ = 100). */
function cpuJiffies(): { busy: number; total: number } {
  const f = Deno.readTextFileSync("/proc/stat").split("\n")[0]!.trim().split(/\s+/).slice(1).map(
    Number,
  );
  const idle = f[3]! + f[4]!;
  const total = f.slice(0, 8).reduce((a, b) => a + b, 0);
  return { busy: total - idle, total };
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
  const before = cpuJiffies();
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
    "--norandommap",
    "--randrepeat=0",
    "--output-format=json",
  ]);
  const after = cpuJiffies();
  const job = JSON.parse(out.slice(out.indexOf("{"))).jobs[0];
  const side = w.rw.includes("read") ? job.read : job.write;
  const ios = side.total_ios as number;
  return {
    iops: side.iops,
    mbPerS: side.bw_bytes / 1e6,
    cpuUsPerIo: ((after.busy - before.busy) * 10_000) / Math.max(1, ios),
  };
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
  const twinFile = "/tmp/bench/twin.img";
  await Deno.writeFile(twinFile, new Uint8Array(0));
  await Deno.truncate(twinFile, SIZE_MIB << 20);
  const twin = await run("losetup", ["--find", "--show", twinFile]);
  // Fill the devices so reads hit real pages, not tmpfs holes.
  for (const dev of [loop, twin]) {
    await run("fio", [
      "--name=fill",
      `--filename=${dev}`,
      "--ioengine=io_uring",
      "--direct=1",
      "--iodepth=16",
      "--rw=write",
      "--bs=1M",
      "--size=100%",
    ]);
  }
  const dmName = "blksnap-bench-linear";
  const sectors = (SIZE_MIB << 20) / 512;
  await run("sh", ["-c", `echo "0 ${sectors} linear ${twin} 0" | dmsetup create ${dmName}`]);
  // No udev in the VM: use devtmpfs's /dev/dm-N rather than /dev/mapper.
  const dmMinor = await run("dmsetup", ["info", "-c", "--noheadings", "-o", "minor", dmName]);
  const dmLinear = `/dev/dm-${dmMinor.trim()}`;

  interface Row {
    workload: string;
    raw: Measurement;
    tracked: Measurement;
    dmLinear: Measurement;
    /** Medians over the alternating runs. */
    trackedRatio: number;
    dmLinearRatio: number;
    /** raw CPU per I/O / tracked CPU per I/O (1 = costs no more CPU than raw). */
    trackedCpuRatio: number;
    ratios: number[];
    /** Batching of the queue loop: ublk requests per io_uring_enter. */
    requestsPerEnter: number;
  }
  const median = (xs: number[]) => [...xs].sort((x, y) => x - y)[Math.floor(xs.length / 2)]!;
  const medianBy = (ms: Measurement[], k: keyof Measurement): Measurement => {
    const m = median(ms.map((x) => x[k]));
    return ms.find((x) => x[k] === m)!;
  };
  const rows: Row[] = [];
  const tracked = await blksnap("attach", "--device", loop);
  try {
    // Warm up: the queue workers' JIT and the page cache, outside the measurements.
    for (const dev of [tracked, dmLinear]) {
      await fio(dev, { name: "warm-up", rw: "randrw", bs: "4k" });
      await fio(dev, { name: "warm-up", rw: "rw", bs: "1M" });
    }
    for (const w of WORKLOADS) {
      // Alternate the devices so drift of the host hits all alike.
      const raws: Measurement[] = [];
      const trs: Measurement[] = [];
      const dms: Measurement[] = [];
      const before = await queueTotals();
      for (let i = 0; i < REPEATS; i++) {
        const raw = await fio(loop, w);
        const tr = await fio(tracked, w);
        const dm = await fio(dmLinear, w);
        raws.push(raw);
        trs.push(tr);
        dms.push(dm);
        console.log(
          `${w.name.padEnd(20)} raw ${fmt(raw)} | tracked ${fmt(tr)} | dm-linear ${fmt(dm)}`,
        );
      }
      const after = await queueTotals();
      const ratios = trs.map((t, i) => t.iops / raws[i]!.iops);
      rows.push({
        workload: w.name,
        raw: medianBy(raws, "iops"),
        tracked: medianBy(trs, "iops"),
        dmLinear: medianBy(dms, "iops"),
        trackedRatio: median(ratios),
        dmLinearRatio: median(dms.map((d, i) => d.iops / raws[i]!.iops)),
        trackedCpuRatio: median(trs.map((t, i) => raws[i]!.cpuUsPerIo / t.cpuUsPerIo)),
        ratios: ratios.map((r) => Number(r.toFixed(3))),
        requestsPerEnter: (after.requests - before.requests) /
          Math.max(1, after.enters - before.enters),
      });
    }
  } finally {
    await blksnap("detach", "--device", loop);
    const st = JSON.parse(await blksnap("status", "--json"));
    if (st.pid) Deno.kill(st.pid, "SIGTERM");
    await run("dmsetup", ["remove", dmName]);
    await run("losetup", ["-d", loop]);
    await run("losetup", ["-d", twin]);
  }

  const table = [
    "| workload | raw IOPS | tracked IOPS | dm-linear IOPS | tracked/raw | dm-linear/raw | CPU µs per I/O raw / tracked / dm-linear | tracked CPU ratio | requests per enter |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ...rows.map((r) =>
      `| ${r.workload} | ${r.raw.iops.toFixed(0)} | ${r.tracked.iops.toFixed(0)} | ${
        r.dmLinear.iops.toFixed(0)
      } | ` +
      `${r.trackedRatio.toFixed(2)} | ${r.dmLinearRatio.toFixed(2)} | ` +
      `${r.raw.cpuUsPerIo.toFixed(0)} / ${r.tracked.cpuUsPerIo.toFixed(0)} / ${
        r.dmLinear.cpuUsPerIo.toFixed(0)
      } | ` +
      `${r.trackedCpuRatio.toFixed(2)} | ${r.requestsPerEnter.toFixed(2)} |`
    ),
  ].join("\n");
  console.log(
    `\nfio io_uring, direct, depth 32, ${RUNTIME_S} s per run, ${REPEATS} alternating runs per line (medians), ` +
      `${SIZE_MIB} MiB loops on tmpfs; daemon args: ${
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
  return `${m.iops.toFixed(0).padStart(6)} IOPS ${m.mbPerS.toFixed(0).padStart(5)} MB/s ${
    m.cpuUsPerIo.toFixed(0).padStart(5)
  } µs CPU/IO`;
}

if (import.meta.main) await main();
