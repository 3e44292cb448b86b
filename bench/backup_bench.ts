/**
 * Benchmark part D (bench/bench.ts runs it when BLKSNAP_BENCH_PARTS has "D";
 * inside the VM): backups of ext4 on a tracked 1 GiB device, filled mostly
 * with incompressible data (files from /dev/urandom), to a directory on
 * another ext4 (the target filesystem, on a loop device of its own).
 *
 *  - a full backup's copy against dd of a snapshot image of the same device
 *    to a file on the target filesystem (bs=4M, conv=sparse,fsync: like the
 *    backup, it writes no block of zeroes and syncs its file), alternating,
 *    REPEATS_D times each (medians): the goal is full/dd >= 0.9, "a backup
 *    runs at the speed of the image";
 *  - an incremental after 1% of the device was rewritten (in place, inside a
 *    file) against the full: time and bytes read.
 *
 * The backup's time is its copy (copySeconds of `backup --json`: from the
 * first read to the synced file, without the CLI's start and the snapshot's
 * create and take); dd's is its run. Under TCG only the ratios mean anything.
 */

/** What part D needs of bench.ts. */
export interface PartDContext {
  /** Runs the CLI (bound to the benchmark's daemon); resolves to its stdout. */
  blksnap: (...args: string[]) => Promise<string>;
  /** Runs a program, requires status 0, resolves to its stdout. */
  run: (cmd: string, args: string[], opts?: { timeoutMs?: number }) => Promise<string>;
  /** A directory on the benchmark's tmpfs for the loop devices' files. */
  work: string;
}

export interface PartDResult {
  deviceMiB: number;
  dataMiB: number;
  repeats: number;
  /** dd of a snapshot image to a file on the target filesystem, per repeat. */
  ddMiBps: number[];
  /** A full backup's copy, per repeat. */
  fullMiBps: number[];
  fullSeconds: number[];
  /** The full backup's CLI run, start to exit (snapshot create, take and destroy included). */
  fullWallSeconds: number[];
  fullBytesRead: number;
  fullBytesStored: number;
  /** median(full) / median(dd); the goal is >= 0.9. */
  fullOverDd: number;
  incremental: {
    changedBytes: number;
    seconds: number;
    wallSeconds: number;
    bytesRead: number;
    bytesStored: number;
    /** Its copy time over the full's (median), and its bytes read over the full's. */
    timeOverFull: number;
    bytesOverFull: number;
  };
}

const MiB = 1024 * 1024;
const DEVICE_MIB = 1024;
/** Files of incompressible data: 13 x 64 MiB, 81% of the device. */
const FILES = 13;
const FILE_MIB = 64;
const REPEATS_D = 2;
const MNT = "/mnt/bench-d";
const TARGET = "/mnt/bench-d-target";
const TIMEOUT_MS = 30 * 60_000;

interface BackupJson {
  kind: string;
  bytesRead: number;
  copySeconds: number;
  devices: Array<{ bytesStored: number }>;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length === 0 ? NaN : s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! +
    s[s.length / 2]!) / 2;
}

function stamp(): string {
  return new Date().toISOString().slice(11, 19);
}

export async function partD(ctx: PartDContext): Promise<PartDResult> {
  const { blksnap, run, work } = ctx;
  // Neither copy finds the other's pages cached, and the VM keeps its RAM for the tmpfs.
  const dropCaches = () => run("sh", ["-c", "sync; echo 3 > /proc/sys/vm/drop_caches"]);
  const long = { timeoutMs: TIMEOUT_MS };
  const diskFile = `${work}/d-disk.img`;
  const targetFile = `${work}/d-target.img`;
  const dir = `${TARGET}/backups`;
  const cleanup: Array<() => Promise<unknown>> = [];
  try {
    await Deno.writeFile(diskFile, new Uint8Array(0));
    await Deno.truncate(diskFile, DEVICE_MIB * MiB);
    const disk = await run("losetup", ["--find", "--show", diskFile]);
    cleanup.unshift(() => run("losetup", ["-d", disk]), () => Deno.remove(diskFile));
    const tracked = await blksnap("attach", "--device", disk);
    cleanup.unshift(() => blksnap("detach", "--device", disk));
    await run("mkfs.ext4", [
      "-q",
      "-F",
      "-E",
      "lazy_itable_init=0,lazy_journal_init=0",
      tracked,
    ]);
    await Deno.mkdir(MNT, { recursive: true });
    await run("mount", [tracked, MNT]);
    cleanup.unshift(() => run("umount", [MNT]));
    // The target filesystem: ext4 on a sparse loop device of its own.
    await Deno.writeFile(targetFile, new Uint8Array(0));
    await Deno.truncate(targetFile, 3 * DEVICE_MIB * MiB);
    const target = await run("losetup", ["--find", "--show", targetFile]);
    cleanup.unshift(() => run("losetup", ["-d", target]), () => Deno.remove(targetFile));
    await run("mkfs.ext4", ["-q", "-F", target]);
    await Deno.mkdir(TARGET, { recursive: true });
    // discard: what is deleted there goes back to the tmpfs (the VM's RAM) under the loop file.
    await run("mount", ["-o", "discard", target, TARGET]);
    cleanup.unshift(() => run("umount", [TARGET]));
    await Deno.mkdir(dir, { recursive: true });

    console.log(`${stamp()} D: writing ${FILES} x ${FILE_MIB} MiB of /dev/urandom to ${MNT}`);
    for (let i = 0; i < FILES; i++) {
      await run("dd", [
        "if=/dev/urandom",
        `of=${MNT}/f${i}`,
        "bs=4M",
        `count=${FILE_MIB / 4}`,
        "status=none",
      ], long);
    }
    await run("sync", []);

    const ddMiBps: number[] = [];
    const fullMiBps: number[] = [];
    const fullSeconds: number[] = [];
    const fullWallSeconds: number[] = [];
    let full: BackupJson | undefined;
    for (let r = 0; r < REPEATS_D; r++) {
      // The points of an earlier repeat go first (room on the target: it is RAM).
      for (const e of Deno.readDirSync(dir)) await Deno.remove(`${dir}/${e.name}`);
      // dd of a snapshot image (the same device, the same target filesystem).
      const id = await blksnap("snapshot_create", "-d", disk, "-f", TARGET, "-l", "1G");
      try {
        await blksnap("snapshot_take", "-i", id);
        const image = await blksnap("snapshot_info", "-d", disk, "-f", "image");
        await dropCaches();
        const t0 = performance.now();
        await run("dd", [
          `if=${image}`,
          `of=${TARGET}/dd.raw`,
          "bs=4M",
          "conv=sparse,fsync",
          "status=none",
        ], long);
        const secs = (performance.now() - t0) / 1000;
        ddMiBps.push(DEVICE_MIB / secs);
        console.log(`${stamp()} D: dd of the image ${(DEVICE_MIB / secs).toFixed(1)} MiB/s`);
      } finally {
        await blksnap("snapshot_destroy", "-i", id);
        await Deno.remove(`${TARGET}/dd.raw`).catch(() => {});
      }
      // A full backup.
      await dropCaches();
      const t0 = performance.now();
      full = JSON.parse(
        await blksnap("backup", "-d", disk, "--to", dir, "--full", "--json"),
      ) as BackupJson;
      fullWallSeconds.push((performance.now() - t0) / 1000);
      if (full.kind !== "full") throw new Error(`part D: the first backup is ${full.kind}`);
      fullSeconds.push(full.copySeconds);
      fullMiBps.push(full.bytesRead / MiB / full.copySeconds);
      console.log(
        `${stamp()} D: full backup ${fullMiBps.at(-1)!.toFixed(1)} MiB/s (${full.copySeconds} s)`,
      );
    }

    // 1% of the device rewritten in place, inside a file; then an incremental.
    const changed = Math.floor(DEVICE_MIB / 100);
    await run("dd", [
      "if=/dev/urandom",
      `of=${MNT}/f3`,
      "bs=1M",
      `count=${changed}`,
      "seek=20",
      "conv=notrunc,fsync",
      "status=none",
    ], long);
    const t0 = performance.now();
    const incr = JSON.parse(
      await blksnap("backup", "-d", disk, "--to", dir, "--json"),
    ) as BackupJson;
    const incrWall = (performance.now() - t0) / 1000;
    if (incr.kind !== "incremental") throw new Error(`part D: the second backup is ${incr.kind}`);
    const fullMedian = median(fullSeconds);
    return {
      deviceMiB: DEVICE_MIB,
      dataMiB: FILES * FILE_MIB,
      repeats: REPEATS_D,
      ddMiBps,
      fullMiBps,
      fullSeconds,
      fullWallSeconds,
      fullBytesRead: full!.bytesRead,
      fullBytesStored: full!.devices[0]!.bytesStored,
      fullOverDd: median(fullMiBps) / median(ddMiBps),
      incremental: {
        changedBytes: changed * MiB,
        seconds: incr.copySeconds,
        wallSeconds: incrWall,
        bytesRead: incr.bytesRead,
        bytesStored: incr.devices[0]!.bytesStored,
        timeOverFull: incr.copySeconds / fullMedian,
        bytesOverFull: incr.bytesRead / full!.bytesRead,
      },
    };
  } finally {
    for (const f of cleanup) await f().catch(() => {});
  }
}

/** The part D table, as the other parts print theirs. */
export function tableD(r: PartDResult): string {
  const f1 = (x: number) => x.toFixed(1);
  const f3 = (x: number) => x.toFixed(3);
  const i = r.incremental;
  return [
    `D. backup of ext4 on a tracked ${r.deviceMiB} MiB device (${r.dataMiB} MiB of ` +
    `incompressible files) to ext4 on another loop device; ${r.repeats} alternating repeats ` +
    `(medians)`,
    "",
    "| measure | value |",
    "|---|---:|",
    `| dd of a snapshot image to a file (bs=4M, conv=sparse,fsync), MiB/s | ${
      f1(median(r.ddMiBps))
    } (${r.ddMiBps.map(f1).join(", ")}) |`,
    `| full backup, copy, MiB/s | ${f1(median(r.fullMiBps))} (${r.fullMiBps.map(f1).join(", ")}) |`,
    `| full backup / dd (goal >= 0.9) | ${r.fullOverDd.toFixed(2)} |`,
    `| full backup: copy s / CLI run s | ${f3(median(r.fullSeconds))} / ${
      f3(median(r.fullWallSeconds))
    } |`,
    `| full backup: bytes read / stored | ${r.fullBytesRead} / ${r.fullBytesStored} |`,
    `| incremental after ${i.changedBytes} bytes (1%) rewritten: copy s / CLI run s | ${
      f3(i.seconds)
    } / ${f3(i.wallSeconds)} |`,
    `| incremental: bytes read / stored | ${i.bytesRead} / ${i.bytesStored} |`,
    `| incremental / full: time, bytes read | ${f3(i.timeOverFull)}, ${f3(i.bytesOverFull)} |`,
  ].join("\n");
}
