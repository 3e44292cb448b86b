/**
 * Upgrade without downtime, on a real kernel: `blksnap daemon --handover`
 * while fio writes with crc32c verification on both queues. The old daemon
 * exits leaving the tracked device quiesced, the next one takes it over:
 * fio sees no error, the CBT map keeps its generation id and every block
 * written before the handover is marked. A handover is refused while a
 * snapshot is held; with --force the snapshot is lost and reported.
 */
import {
  deepStrictEqual as assertEquals,
  match as assertMatch,
  ok as assert,
} from "node:assert/strict";
import {
  assertNoUblkDevices,
  Cli,
  daemonLog,
  Loop,
  sleep,
  startVerifyingFio,
  vmTest,
} from "./_helpers.ts";
import type { StatusResult } from "../../lib/daemon/protocol.ts";

interface CbtInfo {
  generationId: string;
  changesNumber: number;
  blockSize: number;
  blockCount: number;
}

vmTest(
  "daemon --handover under fio --verify on both queues: no error, the CBT map kept",
  async () => {
    const cli = new Cli("handover");
    const loop = await Loop.create(64);
    const diff = await Deno.makeTempDir({ dir: "/tmp" });
    try {
      const tracked = await cli.ok("attach", "--device", loop.path);
      const before = await cli.json<CbtInfo>("cbtinfo", "--device", loop.path);
      let text = "";
      const fio = startVerifyingFio(tracked, { name: "handover", verifyBacklog: 1024 });
      const times: number[] = [];
      let oldPid = 0;
      try {
        await sleep(3000);
        for (let i = 0; i < 2; i++) {
          oldPid = (await cli.json<StatusResult>("status")).pid;
          const r = await cli.json<{ from: number; to: number; ms: number }>(
            "daemon",
            "--handover",
          );
          assertEquals(r.from, oldPid);
          assert(r.to !== oldPid && r.to > 0, "a new daemon serves");
          times.push(r.ms);
          await sleep(2000);
        }
      } finally {
        text = await fio.stop();
      }
      assertMatch(text, /err= 0/, `fio reported errors:\n${text}`);
      const st = await cli.json<StatusResult>("status");
      assertEquals(st.devices.map((d) => d.tracked), [tracked]);
      assert(st.devices[0]!.queueStats.every((q) => q.requests > 0), "both queues serve I/O");
      assertEquals(st.recovery?.recovered.map((d) => d.cbtResetReason), [null], "the map is kept");
      // the same generation; fio's blocks (the whole 64 MiB) marked at the next take
      const after = await cli.json<CbtInfo>("cbtinfo", "--device", loop.path);
      assertEquals(after.generationId, before.generationId);
      const id = await cli.ok(
        "snapshot_create",
        "--device",
        loop.path,
        "--file",
        diff,
        "--limit",
        "64M",
      );
      await cli.ok("snapshot_take", "--id", id);
      const file = "/tmp/handover.map";
      await cli.ok("readcbtmap", "--device", loop.path, "--file", file);
      const map = await Deno.readFile(file);
      await Deno.remove(file);
      const taken = await cli.json<CbtInfo>("cbtinfo", "--device", loop.path);
      const unmarked = [...map].filter((n) => n !== taken.changesNumber).length;
      assertEquals(unmarked, 0, "every block fio wrote across the handovers is marked");

      // refused while a snapshot is held; --force hands over and loses it
      const refused = await cli.run("daemon", "--handover");
      assert(refused.code !== 0, "a handover with a snapshot held is refused");
      assertMatch(refused.stderr, /snapshot\(s\) held/);
      const forced = await cli.json<{ snapshotsLost: number }>("daemon", "--handover", "--force");
      assertEquals(forced.snapshotsLost, 1);
      const s2 = await cli.json<StatusResult>("status");
      assertEquals(s2.recovery?.lostSnapshots.map((x) => x.id), [id]);
      assertEquals(s2.devices.map((d) => d.tracked), [tracked]);
      await cli.run("snapshot_destroy", "--id", id);
      console.log(
        `handover under fio, handover command to the next daemon serving: ${times.join(", ")} ms`,
      );
      await cli.ok("detach", "--device", loop.path);
    } catch (err) {
      console.error(daemonLog(cli).split("\n").slice(-60).join("\n"));
      throw err;
    } finally {
      await cli.run("detach", "--device", loop.path);
      await cli.stopDaemon().catch(() => {});
      await loop.destroy();
      await Deno.remove(diff, { recursive: true }).catch(() => {});
    }
    assertNoUblkDevices();
  },
);
