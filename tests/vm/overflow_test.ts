/**
 * Overflow of the difference storage on a real kernel: a small limit and a
 * burst of writes larger than it. The snapshot is corrupted with -ENOSPC
 * (event, snapshot_info, status), its image fails with EIO, and the writes
 * to the tracked device go on untouched. Runs inside the VM.
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
  sha256Of,
  stopwatch,
  vmTest,
  withDaemonLog,
} from "./_helpers.ts";
import type { StatusResult } from "../../lib/daemon/protocol.ts";

const MiB = 1024 * 1024;

vmTest(
  "a write burst larger than the limit corrupts the snapshot with -ENOSPC; the tracked device keeps every write",
  async () => {
    // 2 MiB portions, a 4 MiB limit.
    const daemonArgs = "--diff-storage-minimum=4096";
    const cli = new EnvCli("overflow", { BLKSNAP_DAEMON_ARGS: daemonArgs });
    const lap = stopwatch("overflow");
    const loop = await Loop.create(64);
    try {
      await withDaemonLog(cli, async () => {
        const tracked = await cli.ok("attach", "--device", loop.path);
        const [major, minor] = (await Deno.readTextFile(`/sys/block/${loop.path.slice(5)}/dev`))
          .trim().split(":");
        const before = randomBytes(32 * MiB);
        await ddWrite(tracked, before, 0);
        await Deno.mkdir("/tmp/overflow-dir", { recursive: true });
        const id = await cli.ok(
          "snapshot_create",
          "--device",
          loop.path,
          "--file",
          "/tmp/overflow-dir",
          "--limit",
          "4M",
        );
        await cli.ok("snapshot_take", "--id", id);
        const image = await cli.ok("snapshot_info", "--device", loop.path, "--field", "image");
        assertEquals(
          await cli.ok("snapshot_info", "--device", loop.path),
          `error_code=0\nimage=${image}`,
        );
        // Before the burst the image reads fine.
        assertEquals(
          await sha256Of(await ddRead(image, MiB, 0, 4)),
          await sha256Of(before.subarray(0, 4 * MiB)),
        );
        lap("attach, write, create, take");

        // The burst: 32 MiB of new data, raw, 8 times the limit. Every write succeeds.
        const burst = randomBytes(32 * MiB);
        await ddWrite(tracked, burst, 0);
        lap("write 32 MiB");

        // Events: no_space (the storage reached its limit) and corrupted, in either order.
        // (An event goes to one waiter: no snapshot_watcher may run beside this.)
        const events: string[] = [];
        for (let i = 0; i < 2; i++) {
          const ev = await cli.ok("snapshot_waitevent", "--id", id, "--timeout", "20000");
          assertMatch(ev, /^result=ok\ntime=\d+\nevent=/, ev);
          events.push(ev);
        }
        // The event's error_code is the positive errno, as the module sends it
        // (diff_area_event_corrupted: .err_code = abs(error_code)), while snapshot_info
        // shows the negative one (-28) below. blksnap.8 and protocol.ts say "negative".
        const corrupted = events.find((e) => e.includes("event=corrupted"));
        assert(corrupted, `a corrupted event: ${events}`);
        assertMatch(
          corrupted,
          new RegExp(
            `^result=ok\ntime=\\d+\nevent=corrupted\ndevice=${major}:${minor}\nerror_code=28$`,
          ),
        );
        const noSpace = events.find((e) => e.includes("event=no_space"));
        assert(noSpace, `a no_space event: ${events}`);
        assertMatch(noSpace, /^result=ok\ntime=\d+\nevent=no_space\nrequested_nr_sect=\d+$/);
        lap(`events: ${JSON.stringify(events)}`);
        // Each is raised once.
        assertEquals(
          await cli.ok("snapshot_waitevent", "--id", id, "--timeout", "1000"),
          "result=timeout",
        );
        lap("events");

        assertEquals(
          await cli.ok("snapshot_info", "--device", loop.path, "--field", "error_code"),
          "-28",
        );
        assertEquals(
          await cli.ok("snapshot_info", "--device", tracked),
          `error_code=-28\nimage=${image}`,
        );
        const st = await daemonRequest<StatusResult>(cli, "status", {});
        const snap = st.snapshots!.find((s) => s.id === id)!;
        assertEquals(snap.errorCode, -28);
        assert(
          snap.storage.capacityBytes <= 4 * MiB,
          `never past the limit: ${JSON.stringify(snap.storage)}`,
        );
        assert(
          snap.storage.filledBytes <= snap.storage.capacityBytes,
          JSON.stringify(snap.storage),
        );

        // The image fails with EIO, at the start and further in.
        for (const skip of [0, 20]) {
          const r = await run("dd", [
            `if=${image}`,
            "of=/dev/null",
            "bs=1M",
            `skip=${skip}`,
            "count=1",
            "iflag=direct",
          ]);
          assert(r.code !== 0, `a read of the corrupted image at ${skip} MiB must fail`);
          assertMatch(r.stderr, /Input\/output error/, r.stderr);
        }
        // The tracked device holds every write of the burst, and the rest as before.
        assertEquals(await sha256Of(await ddRead(tracked, MiB, 0, 32)), await sha256Of(burst));
        assertEquals(
          await sha256Of(await ddRead(tracked, MiB, 32, 32)),
          await sha256Of(new Uint8Array(32 * MiB)),
        );
        // Writes go on after the corruption.
        const more = randomBytes(4 * MiB);
        await ddWrite(tracked, more, 40 * MiB);
        assertEquals(await sha256Of(await ddRead(tracked, MiB, 40, 4)), await sha256Of(more));
        lap("image fails, tracked device checked");

        await cli.ok("snapshot_destroy", "--id", id);
        assertEquals(await cli.ok("snapshot_collect"), "");
        assertEquals([...Deno.readDirSync("/tmp/overflow-dir")], [], "nothing left behind");
        assertEquals(await cli.ok("snapshot_info", "--device", loop.path), "error_code=0\nimage=");
        lap("destroy");

        // A new snapshot after that works.
        const current = burst.slice();
        const id2 = await cli.ok(
          "snapshot_create",
          "--device",
          loop.path,
          "--file",
          "/tmp/overflow-dir",
          "--limit",
          "16M",
        );
        await cli.ok("snapshot_take", "--id", id2);
        const image2 = await cli.ok("snapshot_info", "--device", loop.path, "--field", "image");
        await ddWrite(tracked, randomBytes(4 * MiB), 8 * MiB);
        assertEquals(
          await sha256Of(await ddRead(image2, MiB, 0, 32)),
          await sha256Of(current),
          "the new snapshot's image shows the data from its take",
        );
        assertEquals(
          await cli.ok("snapshot_info", "--device", loop.path, "--field", "error_code"),
          "0",
        );
        await cli.ok("snapshot_destroy", "--id", id2);
        lap("a second snapshot");

        await cli.ok("detach", "--device", loop.path);
        assertEquals(await sha256Of(await ddRead(loop.path, MiB, 40, 4)), await sha256Of(more));
        await cli.stopDaemon();
        assertNoUblkDevices();
      });
    } finally {
      await cli.stopDaemon().catch(() => {});
      await loop.destroy();
    }
  },
);
