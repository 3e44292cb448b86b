/**
 * Copy-on-write under load on a real kernel: fio writes random data to a
 * raw tracked device (io_uring, depth 32, two jobs) while the snapshot image
 * is read end to end again and again; every read of the image must equal the
 * device as it was at the take, block by block, and the tracked device must
 * then hold exactly what fio wrote (fio --verify_only). Runs inside the VM.
 */
import { deepStrictEqual as assertEquals, ok as assert } from "node:assert/strict";
import {
  assertNoUblkDevices,
  blockSums,
  daemonRequest,
  ddRead,
  ddWrite,
  differingBlocks,
  EnvCli,
  Loop,
  randomBytes,
  run,
  stopwatch,
  vmTest,
  withDaemonLog,
} from "./_helpers.ts";
import type { StatusResult } from "../../lib/daemon/protocol.ts";

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 32 * MiB;
const COMPARE = 64 * KiB;

/**
 * One fio run: two jobs, each over its half of the device, every block written
 * once in random order with crc32c verification headers.
 */
function fioArgs(filename: string, bs: string, seed: number): string[] {
  return [
    `--filename=${filename}`,
    "--name=cow",
    "--ioengine=io_uring",
    "--direct=1",
    "--iodepth=32",
    "--numjobs=2",
    `--size=${SIZE / 2 / MiB}M`,
    `--offset_increment=${SIZE / 2 / MiB}M`,
    "--rw=randwrite",
    `--bs=${bs}`,
    `--randseed=${seed}`,
    "--verify=crc32c",
    "--verify_fatal=1",
    "--group_reporting",
  ];
}

/** Block sizes of the successive fio runs. */
const RUNS = ["4k", "64k", "16k", "4k"];
/** fio writes for at least this long, and while the image has been read fewer than 2 times. */
const WRITE_MS = 20_000;

for (const storageKind of ["directory", "blockdev"] as const) {
  vmTest(
    `fio writes at depth 32 while the image is read end to end (storage: ${storageKind}): the image never changes, the device holds fio's data`,
    async () => {
      const cli = new EnvCli(`concurrency-${storageKind}`, {
        BLKSNAP_DAEMON_ARGS: "--diff-storage-minimum=16384",
      });
      const lap = stopwatch("concurrency");
      const loop = await Loop.create(SIZE / MiB);
      // A block device storage takes direct I/O (its blocks are the device's, 512 bytes).
      const storageLoop = storageKind === "blockdev" ? await Loop.create(64) : undefined;
      try {
        await withDaemonLog(cli, async () => {
          const tracked = await cli.ok("attach", "--device", loop.path);
          const before = randomBytes(SIZE);
          await ddWrite(tracked, before, 0);
          const want = await blockSums(before, COMPARE);
          await Deno.mkdir("/tmp/concurrency-diff", { recursive: true });
          const id = await cli.ok(
            "snapshot_create",
            "--device",
            loop.path,
            "--file",
            storageKind === "blockdev" ? storageLoop!.path : "/tmp/concurrency-diff",
            "--limit",
            "64M",
          );
          await cli.ok("snapshot_take", "--id", id);
          const image = await cli.ok("snapshot_info", "--device", loop.path, "--field", "image");
          lap("attach, fill, create, take");

          const checkImage = async (what: string) => {
            const got = await blockSums(await ddRead(image, MiB, 0, SIZE / MiB), COMPARE);
            const bad = differingBlocks(got, want);
            assertEquals(
              bad,
              [],
              `${what}: the image differs from the take in 64 KiB blocks ${bad.slice(0, 20)}`,
            );
          };

          // fio runs back to back (each rewrites the whole device: the last one's data is
          // what the device must hold), while the image is read end to end, again and again.
          let writing = true;
          let passesDuring = 0;
          const writer = (async () => {
            const t0 = performance.now();
            let last: string[] = [];
            let runs = 0;
            try {
              while (runs < 2 || performance.now() - t0 < WRITE_MS || passesDuring < 2) {
                if (performance.now() - t0 > 10 * WRITE_MS) break;
                last = fioArgs(tracked, RUNS[runs % RUNS.length]!, 4242 + runs);
                const r = await run("fio", [...last, "--do_verify=0"]);
                assertEquals(r.code, 0, `fio ${last.join(" ")}:\n${r.stdout}${r.stderr}`);
                runs++;
              }
            } finally {
              writing = false;
            }
            return { last, runs, ms: performance.now() - t0 };
          })();
          while (writing) {
            await checkImage(`pass ${passesDuring + 1}, while fio writes`);
            if (writing) passesDuring++;
            lap(`image pass ${passesDuring} while fio writes`);
          }
          const { last, runs, ms } = await writer;
          lap(`${runs} fio runs in ${(ms / 1000).toFixed(1)} s`);
          assert(
            passesDuring >= 2,
            `the image was read end to end ${passesDuring} times during fio`,
          );
          await checkImage("after fio");

          const st = await daemonRequest<StatusResult>(cli, "status", {});
          const snap = st.snapshots!.find((s) => s.id === id)!;
          assertEquals(snap.errorCode, 0, `not corrupted: ${JSON.stringify(snap)}`);
          assertEquals(snap.storage.io, storageKind === "blockdev" ? "direct" : "buffered");

          // The tracked device holds what fio wrote.
          const v = await run("fio", [...last, "--verify_only"]);
          assertEquals(
            v.code,
            0,
            `fio --verify_only on the tracked device:\n${v.stdout}${v.stderr}`,
          );
          lap("verify");

          await cli.ok("snapshot_destroy", "--id", id);
          assertEquals([...Deno.readDirSync("/tmp/concurrency-diff")], []);
          await cli.ok("detach", "--device", loop.path);
          // ... and so does the original.
          const onOriginal = last.map((a) =>
            a === `--filename=${tracked}` ? `--filename=${loop.path}` : a
          );
          const o = await run("fio", [...onOriginal, "--verify_only"]);
          assertEquals(o.code, 0, `fio --verify_only on the original:\n${o.stdout}${o.stderr}`);
          await cli.stopDaemon();
          assertNoUblkDevices();
        });
      } finally {
        await cli.stopDaemon().catch(() => {});
        await loop.destroy();
        await storageLoop?.destroy();
        await storageLoop?.destroy();
      }
    },
  );
}
