/**
 * The difference storage on a real kernel: a regular file, a directory (an
 * unnamed file, gone after destroy), a block device and a directory on a
 * fresh tmpfs; growth in portions of diff_storage_minimum up to the limit;
 * and the storage paths a snapshot must refuse. The images are checked by
 * checksum against raw data written with dd before each take. Runs inside
 * the VM.
 */
import {
  deepStrictEqual as assertEquals,
  match as assertMatch,
  ok as assert,
} from "node:assert/strict";
import {
  assertNoUblkDevices,
  daemonRequest,
  ddRead,
  ddWrite,
  EnvCli,
  Loop,
  randomBytes,
  run,
  sh,
  sha256Of,
  stopwatch,
  ublkNodes,
  vmTest,
  withDaemonLog,
} from "./_helpers.ts";
import type { StatusResult } from "../../lib/daemon/protocol.ts";
import { O, openLibc } from "../../ffi/libc.ts";

const MiB = 1024 * 1024;

function status(cli: EnvCli): Promise<StatusResult> {
  return daemonRequest<StatusResult>(cli, "status", {});
}

async function collect(cli: EnvCli): Promise<string[]> {
  const out = await cli.ok("snapshot_collect");
  return out === "" ? [] : out.split("\n");
}

/** snapshot_collect over the socket. */
async function collectFast(cli: EnvCli): Promise<string[]> {
  return (await daemonRequest<{ ids: string[] }>(cli, "snapshot_collect", {})).ids;
}

/** Whether nobody holds `path` open exclusively (O_EXCL open of a block device works). */
function exclusiveOpenWorks(path: string): boolean {
  const libc = openLibc();
  try {
    const fd = libc.open(path, O.RDONLY | O.EXCL | O.CLOEXEC);
    libc.close(fd);
    return true;
  } catch {
    return false;
  } finally {
    libc.unload();
  }
}

vmTest(
  "difference storage as a file, a directory, a block device and on tmpfs: images show the data from before the take",
  async () => {
    // 4 MiB portions, so that the storage grows with little data.
    const cli = new EnvCli("storage", { BLKSNAP_DAEMON_ARGS: "--diff-storage-minimum=8192" });
    const lap = stopwatch("storage");
    const loop = await Loop.create(64);
    const storageLoop = await Loop.create(16);
    // Logical blocks larger than the tracked device's: buffered, not direct.
    const storage4k = await Loop.create(16, 4096);
    const tmpfs = "/mnt/diff-tmpfs";
    let tmpfsMounted = false;
    try {
      await withDaemonLog(cli, async () => {
        const tracked = await cli.ok("attach", "--device", loop.path);
        lap("attach");
        // The device as it is before each take: random data over the first 16 MiB.
        const REGION = 8 * MiB;
        let current = randomBytes(REGION);
        await ddWrite(tracked, current, 0);

        await Deno.mkdir("/tmp/diff-dir", { recursive: true });
        await Deno.writeFile("/tmp/diff-file", new Uint8Array(0));
        await Deno.mkdir(tmpfs, { recursive: true });
        await sh("mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", tmpfs);
        tmpfsMounted = true;
        await Deno.mkdir(`${tmpfs}/snap`);

        const kinds = [
          { path: "/tmp/diff-file", kind: "file" },
          { path: "/tmp/diff-dir", kind: "tmpfile" },
          { path: storageLoop.path, kind: "blockdev", io: "direct" },
          { path: storage4k.path, kind: "blockdev", io: "buffered" },
          { path: `${tmpfs}/snap`, kind: "tmpfile" },
        ];
        for (const [i, k] of kinds.entries()) {
          const what = `storage ${k.kind} ${k.path}`;
          const id = await cli.ok(
            "snapshot_create",
            "--device",
            loop.path,
            "--file",
            k.path,
            "--limit",
            "32M",
          );
          assertMatch(id, /^[0-9a-f-]{36}$/, what);
          let snap = (await status(cli)).snapshots!.find((s) => s.id === id)!;
          assertEquals(snap.storage.kind, k.kind, what);
          assertEquals(snap.storage.path, k.path, what);
          assertEquals(snap.storage.limitBytes, 32 * MiB, what);
          if (k.kind === "blockdev") {
            assert(!exclusiveOpenWorks(k.path), `${what}: the snapshot holds the device O_EXCL`);
          }

          await cli.ok("snapshot_take", "--id", id);
          const image = await cli.ok("snapshot_info", "--device", loop.path, "--field", "image");
          assertMatch(image, /^\/dev\/ublkb\d+$/, what);

          lap(`${k.kind}: create, take`);
          // After the take: overwrite 4 MiB (16 chunks) somewhere in the region.
          const before = current;
          current = before.slice();
          const off = (i * 2 * MiB) % (REGION - 4 * MiB);
          current.set(randomBytes(4 * MiB), off);
          await ddWrite(tracked, current.subarray(off, off + 4 * MiB), off);
          lap(`${k.kind}: write 4 MiB`);

          assertEquals(
            await sha256Of(await ddRead(image, MiB, 0, REGION / MiB)),
            await sha256Of(before),
            `${what}: the image shows the data from before the take`,
          );
          lap(`${k.kind}: read the image`);
          snap = (await status(cli)).snapshots!.find((s) => s.id === id)!;
          assertEquals(snap.errorCode, 0, what);
          assertEquals(snap.storage.io, k.io ?? "buffered", what);
          assert(
            snap.storage.filledBytes >= 4 * MiB,
            `${what}: 4 MiB of old data stored: ${JSON.stringify(snap.storage)}`,
          );
          assert(
            snap.storage.capacityBytes <= 32 * MiB,
            `${what}: ${JSON.stringify(snap.storage)}`,
          );
          if (k.kind === "blockdev") {
            assertEquals(snap.storage.capacityBytes, 16 * MiB, `${what}: used whole`);
          }
          if (k.kind === "file") {
            assertEquals(
              Deno.statSync(k.path).size,
              snap.storage.capacityBytes,
              `${what}: the file is grown to the capacity`,
            );
          }

          await cli.ok("snapshot_destroy", "--id", id);
          lap(`${k.kind}: destroy`);
          assertEquals(await collectFast(cli), [], what);
          if (k.kind === "tmpfile") {
            assertEquals([...Deno.readDirSync(k.path)], [], `${what}: nothing left behind`);
          }
          if (k.kind === "file") assert(Deno.statSync(k.path).isFile, `${what}: the file stays`);
          if (k.kind === "blockdev") {
            assert(exclusiveOpenWorks(k.path), `${what}: released after destroy`);
          }
        }
        await sh("umount", tmpfs);
        tmpfsMounted = false;
        // The data written after the last take is on the original.
        await cli.ok("detach", "--device", loop.path);
        assertEquals(
          await sha256Of(await ddRead(loop.path, MiB, 0, REGION / MiB)),
          await sha256Of(current),
          "the original holds what was written",
        );
        await cli.stopDaemon();
        assertNoUblkDevices();
      });
    } finally {
      // The daemon first: a snapshot's storage open on the tmpfs keeps it busy.
      await cli.stopDaemon().catch(() => {});
      if (tmpfsMounted) await run("umount", [tmpfs]);
      await loop.destroy();
      await storageLoop.destroy();
      await storage4k.destroy();
      await Deno.remove("/tmp/diff-file").catch(() => {});
    }
  },
);

vmTest(
  "the difference storage grows in portions of diff_storage_minimum, never past the limit",
  async () => {
    const PORTION = 4 * MiB;
    const LIMIT = 26 * MiB; // not a multiple of the portion: the last growth is cut short
    const cli = new EnvCli("growth", {
      BLKSNAP_DAEMON_ARGS: `--diff-storage-minimum=${PORTION / 512}`,
    });
    const lap = stopwatch("growth");
    const loop = await Loop.create(64);
    try {
      await withDaemonLog(cli, async () => {
        const tracked = await cli.ok("attach", "--device", loop.path);
        const before = randomBytes(32 * MiB);
        await ddWrite(tracked, before, 0);
        await Deno.mkdir("/tmp/growth-dir", { recursive: true });
        const id = await cli.ok(
          "snapshot_create",
          "--device",
          loop.path,
          "--file",
          "/tmp/growth-dir",
          "--limit",
          `${LIMIT / MiB}M`,
        );
        const storage = async () => (await status(cli)).snapshots!.find((s) => s.id === id)!;
        assertEquals((await storage()).storage.capacityBytes, 0, "an unnamed file starts empty");
        await cli.ok("snapshot_take", "--id", id);
        const image = await cli.ok("snapshot_info", "--device", loop.path, "--field", "image");
        lap("attach, write 32 MiB, create, take");

        // 24 MiB of new data in 4 MiB steps: 96 chunks to keep, the storage must grow.
        const capacities: number[] = [];
        const after = before.slice();
        for (let step = 0; step < 6; step++) {
          const data = randomBytes(4 * MiB);
          after.set(data, step * 4 * MiB);
          await ddWrite(tracked, data, step * 4 * MiB);
          const st = (await storage()).storage;
          capacities.push(st.capacityBytes);
          assert(st.capacityBytes <= LIMIT, `past the limit: ${JSON.stringify(st)}`);
          assert(
            st.capacityBytes % PORTION === 0 || st.capacityBytes === LIMIT,
            `capacity not in portions: ${JSON.stringify(st)}`,
          );
          assert(st.filledBytes <= st.capacityBytes, JSON.stringify(st));
        }
        // Wait until every chunk is stored.
        let st = (await storage()).storage;
        for (let i = 0; i < 100 && st.filledBytes < 24 * MiB; i++) {
          await new Promise((r) => setTimeout(r, 100));
          st = (await storage()).storage;
        }
        capacities.push(st.capacityBytes);
        lap("write 24 MiB");
        assertEquals(st.filledBytes, 24 * MiB, `all old data stored: ${JSON.stringify(st)}`);
        assertEquals(st.capacityBytes, LIMIT, `grown up to the limit: ${capacities}`);
        for (let i = 1; i < capacities.length; i++) {
          assert(capacities[i]! >= capacities[i - 1]!, `capacity never shrinks: ${capacities}`);
        }
        assert(new Set(capacities).size >= 4, `grown several times: ${capacities}`);
        const snap = await storage();
        assertEquals(snap.errorCode, 0, "not corrupted: the data fits");

        // Reaching the limit raises no_space, once.
        const ev = await cli.ok("snapshot_waitevent", "--id", id, "--timeout", "5000");
        assertMatch(ev, /^result=ok\ntime=\d+\nevent=no_space\nrequested_nr_sect=\d+$/);
        assertEquals(
          await cli.ok("snapshot_waitevent", "--id", id, "--timeout", "500"),
          "result=timeout",
        );

        assertEquals(
          await sha256Of(await ddRead(image, MiB, 0, 32)),
          await sha256Of(before),
          "the image shows the data from before the take",
        );
        assertEquals(
          await sha256Of(await ddRead(tracked, MiB, 0, 32)),
          await sha256Of(after),
          "the tracked device holds the new data",
        );
        lap("events, read image and tracked device");
        await cli.ok("snapshot_destroy", "--id", id);
        assertEquals(await collect(cli), []);
        assertEquals([...Deno.readDirSync("/tmp/growth-dir")], [], "nothing left behind");
        await cli.ok("detach", "--device", loop.path);
        await cli.stopDaemon();
        assertNoUblkDevices();
      });
    } finally {
      await cli.stopDaemon().catch(() => {});
      await loop.destroy();
    }
  },
);

vmTest(
  "storage misuse: a path that does not exist, storage on a device of the snapshot, limit 0",
  async () => {
    const cli = new EnvCli("storage-bad", { BLKSNAP_DAEMON_ARGS: "--diff-storage-minimum=8192" });
    const lap = stopwatch("storage-bad");
    const a = await Loop.create(32);
    const b = await Loop.create(64);
    const mnt = "/mnt/storage-bad";
    let mounted = false;
    try {
      await withDaemonLog(cli, async () => {
        await cli.ok("attach", "--device", a.path);
        const tb = await cli.ok("attach", "--device", b.path);
        await sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", tb);
        await Deno.mkdir(mnt, { recursive: true });
        await sh("mount", tb, mnt);
        mounted = true;
        await Deno.mkdir(`${mnt}/diffdir`);
        await Deno.writeFile(`${mnt}/difffile`, new Uint8Array(0));
        await Deno.mkdir("/tmp/storage-bad", { recursive: true });
        // One good snapshot, so that "unchanged" means something.
        const keep = await cli.ok(
          "snapshot_create",
          "--device",
          a.path,
          "--file",
          "/tmp/storage-bad",
          "--limit",
          "16M",
        );
        const nodes = ublkNodes();
        lap("set up");

        const cases: Array<{ args: string[]; message: RegExp }> = [
          {
            args: ["--device", b.path, "--file", "/tmp/no/such/dir", "--limit", "16M"],
            message: /"\/tmp\/no\/such\/dir" does not exist/,
          },
          {
            args: ["--device", b.path, "--file", `${mnt}/diffdir`, "--limit", "16M"],
            message: /is on \/dev\/ublkb\d+ .*which is in the snapshot/,
          },
          {
            args: ["--device", tb, "--file", `${mnt}/difffile`, "--limit", "16M"],
            message: /is on \/dev\/ublkb\d+ .*which is in the snapshot/,
          },
          {
            args: ["--device", b.path, "--file", "/tmp/storage-bad", "--limit", "0"],
            message: /limit must be more than 0/,
          },
        ];
        for (const c of cases) {
          const what = `snapshot_create ${c.args.join(" ")}`;
          const r = await cli.run("snapshot_create", ...c.args);
          assertEquals(r.code, 1, `${what}: exit ${r.code}\n${r.stdout}${r.stderr}`);
          assertEquals(r.stdout, "", `${what}: prints no id`);
          assertMatch(r.stderr, /^blksnap: /, what);
          assertMatch(r.stderr, c.message, `${what}: ${r.stderr}`);
          assert(!r.stderr.includes("    at "), `${what}: no stack trace: ${r.stderr}`);
          assertEquals(await collectFast(cli), [keep], `${what}: snapshot_collect unchanged`);
          assertEquals(ublkNodes(), nodes, `${what}: no device made or removed`);
          assertEquals([...Deno.readDirSync(`${mnt}/diffdir`)], [], `${what}: no file left`);
        }
        lap("cases");
        // The same device, through the CLI's --json: the error document.
        const j = await cli.run(
          "snapshot_create",
          "--device",
          b.path,
          "--file",
          `${mnt}/diffdir`,
          "--limit",
          "16M",
          "--json",
        );
        assertEquals(j.code, 1);
        assertEquals(JSON.parse(j.stdout).error.code, "EBUSY", j.stdout);

        await cli.ok("snapshot_destroy", "--id", keep);
        await sh("umount", mnt);
        mounted = false;
        await cli.ok("detach", "--device", a.path);
        await cli.ok("detach", "--device", b.path);
        await cli.stopDaemon();
        assertNoUblkDevices();
      });
    } finally {
      if (mounted) await run("umount", [mnt]);
      await cli.stopDaemon().catch(() => {});
      await a.destroy();
      await b.destroy();
    }
  },
);
