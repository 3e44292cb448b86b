/**
 * Backups on a real kernel: ext4 on a tracked loop device, a full point and
 * two incrementals through `blksnap backup`, each compared by qemu-img with a
 * raw copy of what the snapshot showed (the filesystem is unmounted around
 * those backups, so the tracked device does not change between the take and
 * the copy), each restored to a fresh loop device and checked with e2fsck
 * and file checksums. Then: an incremental after 1% of the device changed
 * reads at most 2% of it; a backup while a writer is busy restores to a
 * clean filesystem; a backup killed mid-copy leaves a snapshot that the next
 * run finds gone (its snapshot went with its connection to the daemon), and
 * that run's point is correct; one killed between snapshot_create and
 * recording the snapshot leaves no snapshot and no image device; --keep; bad input (the
 * directory on the device being backed up, restore onto the tracked original
 * or a mounted device, a corrupted point); a restore over a device full of
 * random data reads back exactly (its zero clusters cleared, not written).
 * Runs inside the VM.
 */
import {
  deepStrictEqual as assertEquals,
  match as assertMatch,
  ok as assert,
} from "node:assert/strict";
import {
  assertNoUblkDevices,
  Cli,
  Loop,
  MAIN,
  pseudoRandomBytes,
  run,
  sh,
  sha256,
  sleep,
  stopwatch,
  ublkNodes,
  vmTest,
  withDaemonLog,
} from "./_helpers.ts";

const MiB = 1024 * 1024;

function existsSync(path: string): boolean {
  try {
    Deno.statSync(path);
    return true;
  } catch {
    return false;
  }
}
const SIZE_MIB = 128;

interface Summary {
  point: string;
  kind: string;
  reason: string;
  previous: string | null;
  bytesRead: number;
  copySeconds: number;
  devices: Array<{ file: string; bytesRead: number; bytesStored: number; changesNumber: number }>;
}

/** Writes files of assorted sizes; returns name -> sha256. */
async function writeFiles(dir: string, prefix: string, seed: number, count: number) {
  const sums = new Map<string, string>();
  for (let i = 0; i < count; i++) {
    const size = [4096, 70_000, 1 << 20, 3 * (1 << 20) + 517][i % 4]!;
    const name = `${prefix}${i}.bin`;
    await Deno.writeFile(`${dir}/${name}`, pseudoRandomBytes(seed + i, size));
    sums.set(name, await sha256(`${dir}/${name}`));
  }
  return sums;
}

/** Restores `point` to a fresh loop device; e2fsck -fn must pass and the files must match. */
async function restoreAndCheck(
  cli: Cli,
  point: string,
  sums: Map<string, string>,
  what: string,
): Promise<void> {
  const loop = await Loop.create(SIZE_MIB);
  const mnt = `/mnt/restore-${point.replace(/\W/g, "")}`;
  try {
    await cli.ok("restore", "--from", point, "--to", loop.path);
    const fsck = await run("e2fsck", ["-fn", loop.path]);
    assertEquals(fsck.code, 0, `${what}: e2fsck -fn\n${fsck.stdout}${fsck.stderr}`);
    await Deno.mkdir(mnt, { recursive: true });
    await sh("mount", "-o", "ro", loop.path, mnt);
    try {
      const names = [...Deno.readDirSync(mnt)].map((e) => e.name).filter((n) => n.endsWith(".bin"));
      assertEquals(names.sort(), [...sums.keys()].sort(), `${what}: the files`);
      for (const [name, sum] of sums) {
        assertEquals(await sha256(`${mnt}/${name}`), sum, `${what}: ${name} differs`);
      }
    } finally {
      await sh("umount", mnt);
    }
  } finally {
    await loop.destroy();
  }
}

/**
 * Runs `args` with stdout on a pseudo-terminal (posix_openpt through FFI: the
 * VM has no script(1)) and returns what it printed there and its exit status.
 */
async function runOnTty(args: string[], env: Record<string, string>) {
  const libc = Deno.dlopen(
    "libc.so.6",
    {
      posix_openpt: { parameters: ["i32"], result: "i32" },
      grantpt: { parameters: ["i32"], result: "i32" },
      unlockpt: { parameters: ["i32"], result: "i32" },
      ptsname_r: { parameters: ["i32", "buffer", "usize"], result: "i32" },
      read: { parameters: ["i32", "buffer", "usize"], result: "isize" },
      close: { parameters: ["i32"], result: "i32" },
    } as const,
  );
  const O_RDWR = 2, O_NOCTTY = 0o400, O_NONBLOCK = 0o4000;
  const master = libc.symbols.posix_openpt(O_RDWR | O_NOCTTY | O_NONBLOCK);
  assert(master >= 0, "posix_openpt failed");
  try {
    assertEquals(libc.symbols.grantpt(master), 0);
    assertEquals(libc.symbols.unlockpt(master), 0);
    const name = new Uint8Array(64);
    assertEquals(libc.symbols.ptsname_r(master, name, BigInt(name.length)), 0);
    const slave = new TextDecoder().decode(name.subarray(0, name.indexOf(0)));
    const child = new Deno.Command("sh", {
      args: ["-c", `exec "$@" >${slave}`, "sh", ...args],
      env,
      stdout: "null",
      stderr: "piped",
    }).spawn();
    const chunks: Uint8Array[] = [];
    const buf = new Uint8Array(65536);
    let done = false;
    const status = child.output().then((o) => {
      done = true;
      return o;
    });
    const drain = () => {
      for (;;) {
        const n = Number(libc.symbols.read(master, buf, BigInt(buf.length)));
        if (n <= 0) return;
        chunks.push(buf.slice(0, n));
      }
    };
    while (!done) {
      drain();
      await sleep(50);
    }
    drain();
    const out = await status;
    const text = new TextDecoder().decode(
      chunks.reduce((a, c) => {
        const m = new Uint8Array(a.length + c.length);
        m.set(a);
        m.set(c, a.length);
        return m;
      }, new Uint8Array(0)),
    );
    return { code: out.code, tty: text, stderr: new TextDecoder().decode(out.stderr) };
  } finally {
    libc.symbols.close(master);
    libc.close();
  }
}

vmTest(
  "backup: ext4 on a tracked device: full and incremental points restore, qemu-img agrees, 1% changed reads under 2%",
  async () => {
    const cli = new Cli("backup");
    const lap = stopwatch("backup");
    const orig = await Loop.create(SIZE_MIB);
    const mnt = "/mnt/backup-fs";
    const dir = "/tmp/backups";
    const raws = "/tmp/backup-raw";
    await Deno.mkdir(dir, { recursive: true });
    await Deno.mkdir(raws, { recursive: true });
    await Deno.mkdir(mnt, { recursive: true });
    let mounted = false;
    let tracked = "";
    const mount = async () => {
      await sh("mount", tracked, mnt);
      mounted = true;
    };
    const umount = async () => {
      await sh("umount", mnt);
      mounted = false;
    };
    const backup = async (...extra: string[]): Promise<Summary> =>
      await cli.json<Summary>("backup", "--device", orig.path, "--to", dir, ...extra);
    /** qemu-img compare of a point with the tracked device as it is now (raw copy). */
    const compareWithDevice = async (s: Summary, n: number) => {
      const raw = `${raws}/p${n}.raw`;
      await sh("dd", `if=${tracked}`, `of=${raw}`, "bs=1M", "iflag=direct", "status=none");
      const q = `${dir}/${s.devices[0]!.file}`;
      const cmp = await run("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", q, raw]);
      assertEquals(cmp.code, 0, `point ${n}: qemu-img compare\n${cmp.stdout}${cmp.stderr}`);
      const check = await run("qemu-img", ["check", q]);
      assertEquals(check.code, 0, `point ${n}: qemu-img check\n${check.stdout}${check.stderr}`);
      await Deno.remove(raw);
    };
    try {
      await withDaemonLog(cli, async () => {
        // Nothing tracked yet: backup says how to attach.
        const untracked = await cli.run("backup", "--device", orig.path, "--to", dir);
        assert(untracked.code !== 0);
        assertMatch(untracked.stderr, /attach/);

        tracked = await cli.ok("attach", "--device", orig.path);
        await sh(
          "mkfs.ext4",
          "-q",
          "-F",
          "-b",
          "4096",
          "-E",
          "lazy_itable_init=0,lazy_journal_init=0",
          tracked,
        );
        await mount();
        const sums1 = await writeFiles(mnt, "a", 100, 16);
        await umount();
        lap("attach, mkfs, files");

        // Point 1: full. The filesystem is unmounted: the device is what the snapshot showed.
        const p1 = await backup();
        assertEquals(p1.kind, "full");
        assertMatch(p1.reason, /no earlier backup/);
        await compareWithDevice(p1, 1);
        lap("full backup");

        // Point 2: files changed, one removed, new ones.
        await mount();
        const sums2 = new Map(sums1);
        for (const [k, v] of await writeFiles(mnt, "a", 200, 3)) sums2.set(k, v);
        for (const [k, v] of await writeFiles(mnt, "b", 300, 5)) sums2.set(k, v);
        await Deno.remove(`${mnt}/a7.bin`);
        sums2.delete("a7.bin");
        await umount();
        const p2 = await backup();
        assertEquals([p2.kind, p2.previous], ["incremental", p1.point]);
        await compareWithDevice(p2, 2);

        // Point 3: more changes.
        await mount();
        const sums3 = new Map(sums2);
        for (const [k, v] of await writeFiles(mnt, "c", 400, 4)) sums3.set(k, v);
        await umount();
        const p3 = await backup("--compress");
        assertEquals([p3.kind, p3.previous], ["incremental", p2.point]);
        await compareWithDevice(p3, 3);
        lap("two incrementals");

        const info = await run("qemu-img", [
          "info",
          "--backing-chain",
          `${dir}/${p3.devices[0]!.file}`,
        ]);
        assertEquals((info.stdout.match(/^file format: qcow2/gm) ?? []).length, 3, info.stdout);
        const list = await cli.ok("backups", "--in", dir);
        assertMatch(list, new RegExp(`${p3.point} .*${p3.point} <- ${p2.point} <- ${p1.point}`));
        assertMatch(await cli.ok("verify", "--from", `${dir}/${p3.point}.json`), /^ok: 3 point/);

        // Nothing changed: exit 4, no point.
        const none = await cli.run("backup", "--device", orig.path, "--to", dir);
        assertEquals(none.code, 4, none.stderr);

        // Each point restores to a fresh device: e2fsck clean, the files of that time.
        await restoreAndCheck(cli, `${dir}/${p1.point}.json`, sums1, "point 1");
        await restoreAndCheck(cli, `${dir}/${p2.point}.json`, sums2, "point 2");
        await restoreAndCheck(cli, `${dir}/${p3.point}.json`, sums3, "point 3");
        lap("three restores");

        // A restore over a device full of random data: its zero clusters are cleared (fallocate
        // ZERO_RANGE, not written) and must read as zeroes: the device equals qemu-img's raw
        // conversion of the point, read back with the page cache dropped.
        {
          const loop = await Loop.create(SIZE_MIB);
          const raw = "/tmp/restore-over-noise.raw";
          try {
            await sh(
              "dd",
              "if=/dev/urandom",
              `of=${loop.path}`,
              "bs=1M",
              `count=${SIZE_MIB}`,
              "oflag=direct",
              "status=none",
            );
            const t0 = performance.now();
            const r = await cli.json<{ bytesWritten: number; bytesZeroed: number }>(
              "restore",
              "--from",
              `${dir}/${p3.point}.json`,
              "--to",
              loop.path,
            );
            const secs = (performance.now() - t0) / 1000;
            console.log(
              `restore over random data: ${r.bytesWritten} bytes written, ${r.bytesZeroed} ` +
                `cleared, ${secs.toFixed(1)} s`,
            );
            assertEquals(r.bytesWritten + r.bytesZeroed, SIZE_MIB * MiB);
            assert(r.bytesZeroed >= SIZE_MIB * MiB / 4, `only ${r.bytesZeroed} bytes cleared`);
            await sh("qemu-img", "convert", "-O", "raw", `${dir}/${p3.devices[0]!.file}`, raw);
            await sh("sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches");
            const cmp = await run("cmp", [loop.path, raw]);
            assertEquals(
              cmp.code,
              0,
              `restore over random data differs\n${cmp.stdout}${cmp.stderr}`,
            );
            const fsck = await run("e2fsck", ["-fn", loop.path]);
            assertEquals(fsck.code, 0, `restore over random data: e2fsck\n${fsck.stdout}`);
          } finally {
            await loop.destroy();
            await Deno.remove(raw).catch(() => {});
          }
        }
        lap("restore over random data");

        // qemu-nbd serves an incremental point (through its chain): a clean filesystem.
        await sh("modprobe", "nbd", "nbds_max=2");
        // qemu-nbd --connect binds a socket under /var/lock, which the VM's root lacks.
        await sh("sh", "-c", "mkdir -p /run/lock; [ -e /var/lock ] || mkdir -p /var/lock");
        await sh(
          "qemu-nbd",
          "--read-only",
          "--format=qcow2",
          "--connect=/dev/nbd0",
          `${dir}/${p3.devices[0]!.file}`,
        );
        try {
          for (
            let i = 0;
            i < 100 && Number(await Deno.readTextFile("/sys/block/nbd0/size")) === 0;
            i++
          ) {
            await sleep(50);
          }
          const fsck = await run("e2fsck", ["-fn", "/dev/nbd0"]);
          assertEquals(fsck.code, 0, `qemu-nbd: e2fsck -fn\n${fsck.stdout}${fsck.stderr}`);
        } finally {
          await run("qemu-nbd", ["--disconnect", "/dev/nbd0"]);
        }
        lap("qemu-nbd");

        // 1% of the device rewritten in place: the incremental reads at most 2%.
        await mount();
        const onePercent = Math.floor((SIZE_MIB * MiB) / 100 / 4096) * 4096;
        const victim = pseudoRandomBytes(500, onePercent);
        await Deno.writeFile(`${mnt}/one-percent.bin`, victim);
        await sh("sync");
        const p4 = await backup();
        const read4 = p4.devices[0]!.bytesRead;
        console.log(
          `backup: incremental after ${onePercent} bytes (1%) written: read ${read4} bytes ` +
            `(${((read4 * 100) / (SIZE_MIB * MiB)).toFixed(2)}% of the device), stored ` +
            `${p4.devices[0]!.bytesStored}`,
        );
        assertEquals(p4.kind, "incremental");
        assert(read4 <= (SIZE_MIB * MiB) / 50, `read ${read4} bytes: more than 2%`);
        lap("1% incremental");

        // A backup while a writer is busy restores to a clean filesystem.
        const sums5 = new Map(sums3);
        sums5.set("one-percent.bin", await sha256(`${mnt}/one-percent.bin`));
        await sh("sync");
        const writer = new Deno.Command("sh", {
          args: [
            "-c",
            `while :; do dd if=/dev/urandom of=${mnt}/busy.tmp bs=64k count=32 conv=fsync status=none; rm -f ${mnt}/busy.tmp; done`,
          ],
          stdout: "null",
          stderr: "null",
        }).spawn();
        let p5: Summary;
        try {
          await sleep(500);
          p5 = await backup();
        } finally {
          writer.kill("SIGKILL");
          await writer.status;
        }
        assertEquals(p5.kind, "incremental");
        {
          const loop = await Loop.create(SIZE_MIB);
          try {
            await cli.ok("restore", "--from", `${dir}/${p5.point}.json`, "--to", loop.path);
            const fsck = await run("e2fsck", ["-fn", loop.path]);
            assertEquals(fsck.code, 0, `busy backup: e2fsck -fn\n${fsck.stdout}${fsck.stderr}`);
            await Deno.mkdir("/mnt/restore-busy", { recursive: true });
            await sh("mount", "-o", "ro", loop.path, "/mnt/restore-busy");
            try {
              for (const [name, sum] of sums5) {
                assertEquals(await sha256(`/mnt/restore-busy/${name}`), sum, `busy: ${name}`);
              }
            } finally {
              await sh("umount", "/mnt/restore-busy");
            }
          } finally {
            await loop.destroy();
          }
        }
        lap("backup under a busy writer");

        // A writer busier than --limit allows: the snapshot overflows during the copy; exit 5,
        // no point, no snapshot and no temporary file left.
        {
          const count = () =>
            [...Deno.readDirSync(dir)].filter((e) => e.name.endsWith(".json")).length;
          const before = count();
          const flood = new Deno.Command("sh", {
            args: [
              "-c",
              `i=0; while :; do dd if=/dev/urandom of=${mnt}/flood$i.tmp bs=1M count=8 conv=fsync status=none; i=$(((i + 1) % 3)); done`,
            ],
            stdout: "null",
            stderr: "null",
          }).spawn();
          let r;
          try {
            await sleep(300);
            r = await cli.run("backup", "-d", orig.path, "--to", dir, "--full", "--limit", "2M");
          } finally {
            flood.kill("SIGKILL");
            await flood.status;
            await sh("sh", "-c", `rm -f ${mnt}/flood*.tmp && sync`);
          }
          assertEquals(r.code, 5, `overflow: exit ${r.code}\n${r.stdout}${r.stderr}`);
          assertMatch(r.stderr, /overflowed .* larger --limit/);
          assertEquals(count(), before);
          assert(![...Deno.readDirSync(dir)].some((e) => e.name.startsWith(".tmp.")));
          assertEquals(await cli.ok("snapshot_collect"), "");
        }
        lap("overflow");

        // SIGTERM mid-copy: the run stops, destroys its snapshot, leaves no file and exits 1.
        {
          const child = new Deno.Command(Deno.execPath(), {
            args: ["run", "-A", "--quiet", MAIN, "backup", "-d", orig.path, "--to", dir, "--full"],
            env: { BLKSNAP_SOCKET: cli.socket },
            stdout: "piped",
            stderr: "piped",
          }).spawn();
          let signalled = false;
          for (let i = 0; i < 2000 && !signalled; i++) {
            if (
              [...Deno.readDirSync(dir)].some((e) =>
                e.name.startsWith(".tmp.") && e.name.endsWith(".qcow2")
              )
            ) {
              child.kill("SIGTERM");
              signalled = true;
            } else await sleep(10);
          }
          const out = await child.output();
          assert(signalled, `the backup ended (${out.code}) before it could be signalled`);
          const err = new TextDecoder().decode(out.stderr);
          assertEquals(out.code, 1, err);
          assertMatch(err, /Interrupted: no point was written/);
          assertEquals(await cli.ok("snapshot_collect"), "", "no snapshot left after SIGTERM");
          assert(
            ![...Deno.readDirSync(dir)].some((e) =>
              e.name.startsWith(".tmp.") || e.name === ".snapshot"
            ),
          );
        }
        lap("SIGTERM mid-copy");

        // SIGKILL between snapshot_create and writing .snapshot (the run waits there, by
        // fault injection): the daemon destroys the snapshot when the connection closes.
        const trackedNodes = ublkNodes();
        const noSnapshotLeft = async (what: string) => {
          let ids = "";
          for (let i = 0; i < 200; i++) {
            ids = await cli.ok("snapshot_collect");
            if (ids === "" && ublkNodes().length === trackedNodes.length) break;
            await sleep(50);
          }
          assertEquals(ids, "", `${what}: a snapshot is left`);
          assertEquals(ublkNodes(), trackedNodes, `${what}: an image device is left`);
          const status = JSON.parse(await cli.ok("status", "--json"));
          assertEquals(status.snapshots ?? [], [], `${what}: status shows a snapshot`);
        };
        {
          const child = new Deno.Command(Deno.execPath(), {
            args: ["run", "-A", "--quiet", MAIN, "backup", "-d", orig.path, "--to", dir],
            env: { BLKSNAP_SOCKET: cli.socket, BLKSNAP_FAULT_BACKUP_AFTER_CREATE_MS: "20000" },
            stdout: "null",
            stderr: "null",
          }).spawn();
          let created = false;
          for (let i = 0; i < 600 && !created; i++) {
            created = (await cli.ok("snapshot_collect")) !== "";
            if (!created) await sleep(50);
          }
          child.kill("SIGKILL");
          await child.status;
          assert(created, "the backup created no snapshot in 30 s");
          assert(!existsSync(`${dir}/.snapshot`), "killed before it wrote .snapshot");
          await noSnapshotLeft("killed after snapshot_create");
        }
        lap("SIGKILL after snapshot_create");

        // Killed mid-copy (a full copy, to be slow enough): the snapshot is left; the next
        // run destroys it and writes a correct point.
        await umount();
        const child = new Deno.Command(Deno.execPath(), {
          args: ["run", "-A", "--quiet", MAIN, "backup", "-d", orig.path, "--to", dir, "--full"],
          env: { BLKSNAP_SOCKET: cli.socket },
          stdout: "null",
          stderr: "null",
        }).spawn();
        let killedMidCopy = false;
        for (let i = 0; i < 2000; i++) {
          const names = [...Deno.readDirSync(dir)].map((e) => e.name);
          if (names.some((n) => n.startsWith(".tmp.") && n.endsWith(".qcow2"))) {
            child.kill("SIGKILL");
            killedMidCopy = true;
            break;
          }
          await sleep(10);
        }
        const st = await child.status;
        assert(killedMidCopy, `the backup ended (${st.code}) before it could be killed`);
        // Its snapshot went with its connection: no snapshot, no image device; the
        // .snapshot it wrote names a snapshot the next run finds gone.
        await noSnapshotLeft("killed mid-copy");
        assert(Deno.statSync(`${dir}/.snapshot`).isFile, "the killed run's .snapshot is there");
        const p6 = await backup();
        assertEquals(await cli.ok("snapshot_collect"), "", "no snapshot left");
        assert(![...Deno.readDirSync(dir)].some((e) => e.name.startsWith(".tmp.")));
        await compareWithDevice(p6, 6);
        assertMatch(await cli.ok("verify", "--from", `${dir}/${p6.point}.json`), /^ok:/);
        lap("killed backup, next run");

        // --keep 2: the older points go, the rest restore.
        const p7 = await backup("--keep", "2", "--full");
        const names = [...Deno.readDirSync(dir)].map((e) => e.name).filter((n) =>
          n.endsWith(".json")
        );
        assertEquals(names.sort(), [`${p6.point}.json`, `${p7.point}.json`].sort());
        await restoreAndCheck(cli, `${dir}/${p6.point}.json`, sums5, "point 6 after --keep");

        // The README's cron line, as cron's sh runs it, with blksnap on PATH: a point, then
        // nothing to do (exit 4), which the line does not report as a failure.
        const cron = Deno.readTextFileSync(
          new URL("../../contrib/blksnap-backup.cron", import.meta.url),
        )
          .split("\n").find((l) => l.startsWith("30 2 * * *"))!.replace(
            /^30 2 \* \* \* +root +/,
            "",
          )
          .replaceAll("/dev/sdb1", orig.path).replaceAll("/backup/sdb1", dir);
        assert(
          Deno.readTextFileSync(new URL("../../README.md", import.meta.url)).includes(
            cron.replaceAll(orig.path, "/dev/sdb1").replaceAll(dir, "/backup/sdb1"),
          ),
          "the README shows the cron line of contrib/blksnap-backup.cron",
        );
        await Deno.mkdir("/tmp/cron-bin", { recursive: true });
        await Deno.writeTextFile(
          "/tmp/cron-bin/blksnap",
          `#!/bin/sh\nexec ${Deno.execPath()} run -A --quiet ${MAIN} "$@"\n`,
          { mode: 0o755 },
        );
        const cronEnv = {
          PATH: `/tmp/cron-bin:${Deno.env.get("PATH")}`,
          BLKSNAP_SOCKET: cli.socket,
        };
        await mount();
        await Deno.writeFile(`${mnt}/cron.bin`, pseudoRandomBytes(900, 200_000));
        await umount();
        const before = [...Deno.readDirSync(dir)].filter((e) => e.name.endsWith(".json")).length;
        const c1 = await run("sh", ["-c", cron], cronEnv);
        assertEquals([c1.code, c1.stdout, c1.stderr], [0, "", ""], "the cron line, a point");
        const after = [...Deno.readDirSync(dir)].filter((e) => e.name.endsWith(".json")).length;
        assertEquals(after, Math.min(14, before + 1));
        const c2 = await run("sh", ["-c", `${cron}; echo "status=$s"`], cronEnv);
        assertEquals([c2.code, c2.stdout.trim(), c2.stderr], [0, "status=4", ""], "nothing to do");
        lap("the cron line");

        // Throughput under TCG (reported, not asserted: only ratios within one run mean
        // anything): dd of a snapshot image to a file against a full backup's copy, and the
        // 1% incremental against the full one.
        {
          const id = await cli.ok("snapshot_create", "-d", orig.path, "-f", "/tmp", "-l", "1G");
          await cli.ok("snapshot_take", "-i", id);
          const img = await cli.ok("snapshot_info", "-d", orig.path, "-f", "image");
          const t0 = performance.now();
          await sh("dd", `if=${img}`, "of=/tmp/bench-dd.raw", "bs=4M", "status=none");
          const ddSecs = (performance.now() - t0) / 1000;
          await cli.ok("snapshot_destroy", "-i", id);
          await Deno.remove("/tmp/bench-dd.raw");
          const pf = await backup("--full");
          const rate = (bytes: number, secs: number) => (bytes / MiB / secs).toFixed(1);
          const ddRate = (SIZE_MIB * MiB) / ddSecs;
          const fullRate = pf.bytesRead / pf.copySeconds;
          console.log(
            `backup bench: dd of the image ${rate(SIZE_MIB * MiB, ddSecs)} MiB/s; full backup ` +
              `${rate(pf.bytesRead, pf.copySeconds)} MiB/s (${pf.copySeconds} s, ratio ` +
              `${(fullRate / ddRate).toFixed(2)}); 1% incremental ${p4.copySeconds} s, ` +
              `${p4.bytesRead} bytes read (${(p4.copySeconds / pf.copySeconds).toFixed(3)} of ` +
              `the full's time)`,
          );
        }
        lap("throughput");

        // The progress bar, with stdout a terminal: percent, amounts, rate and time left.
        {
          const r = await runOnTty(
            [
              Deno.execPath(),
              "run",
              "-A",
              "--quiet",
              MAIN,
              "backup",
              "-d",
              orig.path,
              "--to",
              dir,
              "--full",
            ],
            { BLKSNAP_SOCKET: cli.socket, PATH: Deno.env.get("PATH") ?? "/usr/bin:/bin" },
          );
          assertEquals(r.code, 0, `backup on a tty: exit ${r.code}\n${r.stderr}`);
          const lines = r.tty.split("\r").map((l) => l.replaceAll("\x1b[K", "").trim()).filter((
            l,
          ) => l !== "");
          const bar =
            /^\[[#.]{20}\] +\d{1,3}% \d+\.\d (MiB|GiB) of \d+\.\d (MiB|GiB), \d+\.\d (MiB|GiB)\/s, \d+ s left$/;
          assert(
            lines.length >= 2,
            `the bar was drawn ${lines.length} time(s): ${JSON.stringify(r.tty)}`,
          );
          for (const l of lines) assertMatch(l, bar);
          assertMatch(lines.at(-1)!, /\] 100% /);
          assert(r.tty.endsWith("\n"), "the bar ends with a newline");
          console.log(`progress bar: ${lines.length} updates, last: ${lines.at(-1)}`);
        }
        lap("progress bar");

        // A full target filesystem: a clear error, no point and no temporary file left, the
        // snapshot destroyed.
        await Deno.mkdir("/mnt/small-target", { recursive: true });
        await sh("mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", "/mnt/small-target");
        try {
          const r = await cli.run(
            "backup",
            "-d",
            orig.path,
            "--to",
            "/mnt/small-target",
            "--diff-storage",
            "/tmp",
          );
          assertEquals(r.code, 1, r.stderr);
          assertMatch(r.stderr, /No space left on device/);
          assertEquals(
            [...Deno.readDirSync("/mnt/small-target")].map((e) => e.name).filter((n) =>
              n !== ".lock"
            ),
            [],
          );
          assertEquals(await cli.ok("snapshot_collect"), "");
        } finally {
          await sh("umount", "/mnt/small-target");
        }

        // Bad input.
        await mount();
        const onDevice = await cli.run("backup", "-d", orig.path, "--to", mnt);
        assertEquals(onDevice.code, 1);
        assertMatch(onDevice.stderr, /is on .* a device being backed up/);
        assert(
          ![...Deno.readDirSync(mnt)].some((e) => e.name.startsWith(".")),
          "nothing written there",
        );
        const ontoMounted = await cli.run(
          "restore",
          "--from",
          `${dir}/${p7.point}.json`,
          "--to",
          tracked,
        );
        assertEquals(ontoMounted.code, 1);
        assertMatch(ontoMounted.stderr, /is mounted at/);
        await umount();
        const ontoOriginal = await cli.run(
          "restore",
          "--from",
          `${dir}/${p7.point}.json`,
          "--to",
          orig.path,
        );
        assertEquals(ontoOriginal.code, 1);
        assertMatch(ontoOriginal.stderr, /is in use/);
        const small = await Loop.create(SIZE_MIB / 2);
        try {
          const r = await cli.run(
            "restore",
            "--from",
            `${dir}/${p7.point}.json`,
            "--to",
            small.path,
          );
          assertEquals(r.code, 1);
          assertMatch(r.stderr, /less than/);
        } finally {
          await small.destroy();
        }
        const q7 = `${dir}/${p7.devices[0]!.file}`;
        const bytes = await Deno.readFile(q7);
        bytes[65536 + 100] = bytes[65536 + 100]! ^ 0xff; // the first data cluster
        await Deno.writeFile(q7, bytes);
        const bad = await cli.run("verify", "--from", `${dir}/${p7.point}.json`);
        assertEquals(bad.code, 1);
        assertMatch(
          bad.stderr,
          new RegExp(`point ${p7.point}, device .*, offset \\d+, length \\d+`),
        );
        // Restore of the corrupted point: refused before a byte is written.
        const fresh = await Loop.create(SIZE_MIB);
        try {
          const untouched = await sha256(fresh.path);
          const r = await cli.run(
            "restore",
            "--from",
            `${dir}/${p7.point}.json`,
            "--to",
            fresh.path,
          );
          assertEquals(r.code, 1, r.stderr);
          assertMatch(
            r.stderr,
            new RegExp(`Point ${p7.point} is damaged, nothing was restored: .*does not match`),
          );
          assertEquals(await sha256(fresh.path), untouched, "the target is untouched");
          // A broken chain: the newest incremental point's backing file is gone;
          // verify and restore name the missing file, and restore writes nothing.
          const manifests = [...Deno.readDirSync(dir)]
            .filter((e) => /^[^.].*\.json$/.test(e.name))
            .map((e) => JSON.parse(Deno.readTextFileSync(`${dir}/${e.name}`)))
            .sort((a, b) => b.sequence - a.sequence);
          const inc = manifests.find((m) => m.kind === "incremental" && m.previous !== null);
          assert(inc, "an incremental point to break");
          const backing = `${dir}/${inc.devices[0].backing}`;
          await Deno.rename(backing, `${backing}.moved`);
          try {
            for (const args of [["verify"], ["restore", "--to", fresh.path]]) {
              const b = await cli.run(
                args[0]!,
                "--from",
                `${dir}/${inc.id}.json`,
                ...args.slice(1),
              );
              assertEquals(b.code, 1, `${args[0]}: ${b.stderr}`);
              assertMatch(b.stderr, /Broken chain: point .*: its file .* is missing/);
            }
            assertEquals(await sha256(fresh.path), untouched, "the target is untouched");
          } finally {
            await Deno.rename(`${backing}.moved`, backing);
          }
        } finally {
          await fresh.destroy();
        }
        lap("keep, bad input");
      });
    } finally {
      if (mounted) await run("umount", [mnt]);
      await cli.stopDaemon().catch(() => {});
      await orig.destroy();
      await Deno.remove(dir, { recursive: true }).catch(() => {});
      await Deno.remove(raws, { recursive: true }).catch(() => {});
    }
    assertNoUblkDevices();
  },
);
