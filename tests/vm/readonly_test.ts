/**
 * A read-only original (losetup -r) gets a read-only tracked device: the
 * kernel reports it read-only, a write is refused cleanly (EPERM/EROFS, never
 * an I/O error from the daemon), reads return the original's data. Runs
 * inside the VM (tools/vm.sh test).
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
  pseudoRandomBytes,
  run,
  sh,
  sha256,
  ublkNodes,
  vmTest,
  withDaemonLog,
} from "./_helpers.ts";
import type { StatusResult } from "../../lib/daemon/protocol.ts";

function totals(s: StatusResult, tracked: string) {
  const d = s.devices.find((x) => x.tracked === tracked);
  assert(d, `${tracked} is not in status`);
  const sum = (k: "writes" | "errors" | "reads") => d.queueStats.reduce((a, q) => a + q[k], 0);
  return {
    readOnly: d.readOnly,
    writes: sum("writes"),
    errors: sum("errors"),
    reads: sum("reads"),
  };
}

vmTest("a read-only original (losetup -r) is tracked by a read-only device", async () => {
  const cli = new Cli("readonly");
  // An ext4 with known files, made through a writable loop device first.
  const rw = await Loop.create(64);
  const file = rw.file;
  await sh("mkfs.ext4", "-q", "-F", rw.path);
  await Deno.mkdir("/mnt/ro", { recursive: true });
  await sh("mount", rw.path, "/mnt/ro");
  const sums = new Map<string, string>();
  for (let i = 0; i < 6; i++) {
    const name = `file${i}.bin`;
    await Deno.writeFile(`/mnt/ro/${name}`, pseudoRandomBytes(7000 + i, (i + 1) * 200_000));
    sums.set(name, await sha256(`/mnt/ro/${name}`));
  }
  await sh("umount", "/mnt/ro");
  await sh("losetup", "-d", rw.path);
  const original = await sh("losetup", "--read-only", "--find", "--show", file);
  const writable = await Loop.create(16);
  try {
    await withDaemonLog(cli, async () => {
      assertEquals(await sh("blockdev", "--getro", original), "1");
      const originalSum = await sha256(original);

      const tracked = await cli.ok("attach", "--device", original);
      assertMatch(tracked, /^\/dev\/ublkb\d+$/);
      assertEquals(await sh("blockdev", "--getro", tracked), "1", "the tracked device is ro");
      assertEquals(
        Deno.readTextFileSync(`/sys/block/${tracked.slice(5)}/ro`).trim(),
        "1",
      );
      const before = totals(await cli.json<StatusResult>("status"), tracked);
      assertEquals(before.readOnly, true);
      assertMatch(await cli.ok("status"), new RegExp(`${tracked} \\(\\d+:\\d+\\) .* ro `));

      // A write is refused by the kernel, before it reaches the daemon.
      const w = await run("dd", [
        "if=/dev/zero",
        `of=${tracked}`,
        "bs=4096",
        "count=1",
        "oflag=direct",
        "conv=notrunc",
        "status=none",
      ]);
      assert(w.code !== 0, "a write to the read-only tracked device succeeded");
      assertMatch(w.stderr, /Operation not permitted|Read-only file system/, w.stderr);
      const after = totals(await cli.json<StatusResult>("status"), tracked);
      assertEquals([after.writes, after.errors], [0, 0], "no write reached the daemon");

      // Reads return the original's data: the whole device, then the files.
      assertEquals(await sha256(tracked), originalSum);
      await sh("mount", "-o", "ro", tracked, "/mnt/ro");
      try {
        for (const [name, sum] of sums) assertEquals(await sha256(`/mnt/ro/${name}`), sum, name);
      } finally {
        await sh("umount", "/mnt/ro");
      }

      // A writable original still gets a writable tracked device beside it.
      const rwTracked = await cli.ok("attach", "--device", writable.path);
      assertEquals(await sh("blockdev", "--getro", rwTracked), "0");
      const rwStatus = totals(await cli.json<StatusResult>("status"), rwTracked);
      assertEquals(rwStatus.readOnly, false);
      await cli.ok("detach", "--device", writable.path);

      await cli.ok("detach", "--device", original);
      assertEquals(ublkNodes(), []);
      assertEquals(await sha256(original), originalSum, "the original is unchanged");
      await sh("e2fsck", "-f", "-n", original);
    });
  } finally {
    await cli.stopDaemon();
    await run("losetup", ["-d", original]);
    await Deno.remove(file).catch(() => {});
    await writable.destroy();
  }
  assertNoUblkDevices();
});
