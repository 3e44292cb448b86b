/**
 * The daemon killed with SIGKILL at the worst moments, on a real kernel: under
 * fio with crc32c verification on both queues (ten times in a row), during
 * attach, detach, a snapshot take and copy-on-write. Whatever the moment, the
 * next command starts a daemon that takes the devices over: no I/O error, no
 * acknowledged write lost, no second device over an original, the original
 * correct, a snapshot that existed reported corrupted, nothing left behind,
 * and the CBT map kept (same generation id, every block written before the
 * kill marked). Prints the recovery times (SIGKILL to I/O flowing again).
 *
 * BLKSNAP_CRASH_SEED replays the random kill moments; it is printed on failure.
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
  EnvCli,
  Loop,
  pseudoRandomBytes,
  run,
  sh,
  sha256,
  sleep,
  startVerifyingFio,
  ublkNodes,
  vmTest,
} from "./_helpers.ts";
import type { StatusResult } from "../../lib/daemon/protocol.ts";
import { Rng } from "../../lib/engine/_test_util.ts";

const SEED = Number(Deno.env.get("BLKSNAP_CRASH_SEED") ?? String(Date.now() % 2 ** 31));

/** Runs `fn`, printing the seed and the daemon's log on failure. */
async function seeded(cli: Cli, fn: (r: () => number) => Promise<void>): Promise<void> {
  try {
    const r = new Rng(SEED);
    await fn(() => r.next());
  } catch (err) {
    console.error(`crash test failed with BLKSNAP_CRASH_SEED=${SEED}`);
    console.error(daemonLog(cli).split("\n").slice(-80).join("\n"));
    throw err;
  }
}

async function status(cli: Cli): Promise<StatusResult & { running: boolean }> {
  return await cli.json<StatusResult & { running: boolean }>("status");
}

/** SIGKILLs the CLI's daemon and waits until it is gone; returns when it was killed. */
async function killDaemon(cli: Cli): Promise<number> {
  const s = await status(cli);
  assert(s.running && s.pid > 0, "a daemon to kill");
  Deno.kill(s.pid, "SIGKILL");
  const killed = performance.now();
  for (let i = 0; i < 600; i++) {
    try {
      Deno.statSync(`/proc/${s.pid}`);
    } catch {
      return killed;
    }
    await sleep(20);
  }
  throw new Error(`daemon ${s.pid} still there 12 s after SIGKILL`);
}

/**
 * The next command a user would run: it starts a daemon, which takes the
 * devices over. Returns the new daemon's status.
 */
async function revive(cli: Cli, original: string): Promise<StatusResult & { running: boolean }> {
  await cli.ok("cbtinfo", "--device", original);
  return await status(cli);
}

/** One 4 KiB O_DIRECT write and read of `path` at `offset`; throws on an I/O error or after 60 s. */
async function ioFlows(path: string, offset: number): Promise<void> {
  const r = await run("timeout", [
    "60",
    "dd",
    `if=${path}`,
    `of=${path}`,
    "bs=4096",
    "count=1",
    `skip=${offset / 4096}`,
    `seek=${offset / 4096}`,
    "iflag=direct",
    "oflag=direct",
    "conv=notrunc",
    "status=none",
  ]);
  assertEquals(r.code, 0, `I/O to ${path} after recovery: ${r.stderr}`);
}

function summary(ms: number[]): string {
  const s = [...ms].sort((a, b) => a - b);
  return `min ${s[0]!.toFixed(0)} ms, median ${s[s.length >> 1]!.toFixed(0)} ms, max ${
    s[s.length - 1]!.toFixed(0)
  } ms`;
}

vmTest(
  "SIGKILL ten times under fio --verify=crc32c on both queues: no verify or I/O error",
  async () => {
    const cli = new Cli("crash-fio");
    const loop = await Loop.create(64);
    await seeded(cli, async (r) => {
      const tracked = await cli.ok("attach", "--device", loop.path);
      let text = "";
      const fio = startVerifyingFio(tracked, {
        name: "crash",
        verifyBacklog: 2048,
        extra: [`--randseed=${SEED}`, "--loops=1000"],
      });
      const times: number[] = [];
      try {
        await sleep(3000);
        for (let i = 0; i < 10; i++) {
          const killed = await killDaemon(cli);
          await sleep(200 + r() * 1500); // I/O waits meanwhile
          const s = await revive(cli, loop.path);
          await ioFlows(tracked, 60 << 20);
          times.push(performance.now() - killed);
          assertEquals(s.devices.map((d) => d.tracked), [tracked], "the same device, once");
          await sleep(500 + r() * 2000);
        }
      } finally {
        text = await fio.stop();
      }
      assert(/err= 0/.test(text), `fio reported errors:\n${text}`);
      const s = await status(cli);
      const q = s.devices[0]!.queueStats;
      assert(q.length === 2 && q.every((x) => x.requests > 0), "both queues served I/O");
      console.log(`recovery under fio, SIGKILL to I/O flowing: ${summary(times)}`);
      await cli.ok("detach", "--device", loop.path);
    }).finally(async () => {
      await cli.run("detach", "--device", loop.path);
      await cli.stopDaemon().catch(() => {});
      await loop.destroy();
    });
    assertNoUblkDevices();
  },
);

vmTest(
  "SIGKILL during attach and during detach: one device or none, the original intact",
  async () => {
    const cli = new Cli("crash-attach");
    const loop = await Loop.create(32);
    await seeded(cli, async (r) => {
      await Deno.writeFile(loop.path, pseudoRandomBytes(SEED, 32 << 20));
      const sum = await sha256(loop.path);
      await cli.ok("status"); // a daemon to kill
      for (let round = 0; round < 4; round++) {
        const detaching = round % 2 === 1;
        if (detaching) await cli.ok("attach", "--device", loop.path);
        else if ((await status(cli)).running === false) await cli.ok("status");
        const cmd = new Deno.Command(Deno.execPath(), {
          args: [
            "run",
            "-A",
            "--quiet",
            new URL("../../main.ts", import.meta.url).pathname,
            detaching ? "detach" : "attach",
            "--device",
            loop.path,
          ],
          env: { BLKSNAP_SOCKET: cli.socket },
          stdout: "null",
          stderr: "null",
        }).spawn();
        await sleep(r() * 2500);
        const s0 = await status(cli).catch(() => null);
        if (s0?.running) {
          Deno.kill(s0.pid, "SIGKILL");
        }
        await cmd.status;
        await sleep(300);
        const s = await revive(cli, loop.path).catch(async () => await status(cli));
        const mine = s.devices.filter((d) => d.original === loop.path);
        assert(mine.length <= 1, `round ${round}: ${mine.length} devices over one original`);
        assertEquals(ublkNodes().filter((n) => n.startsWith("ublkb")).length, mine.length);
        // attach again: refused while it is tracked (naming the device), never a second one
        let tracked: string;
        if (mine.length === 1) {
          const twice = await cli.run("attach", "--device", loop.path);
          assert(twice.code !== 0, `round ${round}: a second attach of a tracked original`);
          assert(twice.stderr.includes(mine[0]!.tracked), twice.stderr);
          tracked = mine[0]!.tracked;
        } else {
          tracked = await cli.ok("attach", "--device", loop.path);
        }
        const again = (await status(cli)).devices.filter((d) => d.original === loop.path);
        assertEquals(again.map((d) => d.tracked), [tracked]);
        assertEquals(await sha256(tracked), sum, `round ${round}: data through the tracked device`);
        await cli.ok("detach", "--device", loop.path);
        assertEquals(await sha256(loop.path), sum, `round ${round}: the original`);
      }
    }).finally(async () => {
      await cli.run("detach", "--device", loop.path);
      await cli.stopDaemon().catch(() => {});
      await loop.destroy();
    });
    assertNoUblkDevices();
  },
);

vmTest(
  "SIGKILL during a take and during copy-on-write: the filesystem is thawed and intact, the snapshot reported corrupted, nothing left",
  async () => {
    const cli = new Cli("crash-snap");
    const loop = await Loop.create(96);
    const diff = await Deno.makeTempDir({ dir: "/tmp" });
    const mnt = await Deno.makeTempDir({ dir: "/tmp" });
    let mounted = false;
    await seeded(cli, async (r) => {
      const tracked = await cli.ok("attach", "--device", loop.path);
      await sh("mkfs.ext4", "-q", "-F", tracked);
      await sh("mount", tracked, mnt);
      mounted = true;
      const sums = new Map<string, string>();
      let fileNo = 0;
      const writeFile = async (bytes: number) => {
        const name = `${mnt}/f${fileNo}`;
        const data = pseudoRandomBytes(SEED + fileNo++, bytes);
        await Deno.writeFile(name, data);
        const f = await Deno.open(name, { read: true });
        await f.sync();
        f.close();
        sums.set(name, await sha256(name));
      };
      for (let i = 0; i < 8; i++) await writeFile(1 << 20);
      const times: number[] = [];
      for (const moment of ["take", "cow"] as const) {
        const id = (await cli.ok(
          "snapshot_create",
          "--device",
          loop.path,
          "--file",
          diff,
          "--limit",
          "256M",
        ))
          .trim();
        let killed = 0;
        if (moment === "take") {
          const take = new Deno.Command(Deno.execPath(), {
            args: [
              "run",
              "-A",
              "--quiet",
              new URL("../../main.ts", import.meta.url).pathname,
              "snapshot_take",
              "--id",
              id,
            ],
            env: { BLKSNAP_SOCKET: cli.socket },
            stdout: "null",
            stderr: "null",
          }).spawn();
          await sleep(300 + r() * 2000);
          killed = await killDaemon(cli);
          await take.status;
        } else {
          await cli.ok("snapshot_take", "--id", id);
          // copy-on-write under way: a writer rewrites the old files while the daemon dies
          const writer = (async () => {
            for (let i = 0; i < 8; i++) await writeFile(1 << 20);
          })();
          await sleep(200 + r() * 800);
          killed = await killDaemon(cli);
          await sleep(300);
          await revive(cli, loop.path);
          await writer;
        }
        const s = await revive(cli, loop.path);
        // the filesystem is not left frozen: a write with fsync completes (in bounded time)
        const probe = await run("timeout", [
          "60",
          "dd",
          "if=/dev/zero",
          `of=${mnt}/probe`,
          "bs=4096",
          "count=1",
          "conv=fsync",
          "status=none",
        ]);
        assertEquals(probe.code, 0, `a write after the take was killed: ${probe.stderr}`);
        times.push(performance.now() - killed);
        assertEquals(s.devices.map((d) => d.tracked), [tracked]);
        // reported lost (corrupted) with its reason, by the daemon that took over
        const lost = s.recovery?.lostSnapshots.find((x) => x.id === id);
        const held = (s.snapshots ?? []).find((x) => x.id === id);
        assert(
          lost !== undefined || (held !== undefined && held.errorCode < 0),
          `snapshot ${id} after a crash: ${JSON.stringify({ lost, held, recovery: s.recovery })}`,
        );
        if (lost) assert(lost.reason.length > 0, "a reason");
        await cli.run("snapshot_destroy", "--id", id);
        const after = await status(cli);
        assertEquals((after.snapshots ?? []).filter((x) => x.id === id), [], "snapshot left");
        assertEquals(ublkNodes().filter((n) => n.startsWith("ublkb")).length, 1, "image left");
        assertEquals([...Deno.readDirSync(diff)], [], "difference storage left in the directory");
      }
      for (const [name, sum] of sums) assertEquals(await sha256(name), sum, name);
      await sh("umount", mnt);
      mounted = false;
      await sh("e2fsck", "-fn", tracked);
      await cli.ok("detach", "--device", loop.path);
      await sh("e2fsck", "-fn", loop.path);
      console.log(`recovery after SIGKILL in a take / in copy-on-write: ${summary(times)}`);
    }).finally(async () => {
      if (mounted) await run("umount", [mnt]);
      await cli.run("detach", "--device", loop.path);
      await cli.stopDaemon().catch(() => {});
      await loop.destroy();
      await Deno.remove(diff, { recursive: true }).catch(() => {});
      await Deno.remove(mnt, { recursive: true }).catch(() => {});
    });
    assertNoUblkDevices();
  },
);

vmTest(
  "SIGKILL keeps the CBT map: same generation id, every block written before it marked",
  async () => {
    const cli = new Cli("crash-cbt");
    const loop = await Loop.create(32);
    const diff = await Deno.makeTempDir({ dir: "/tmp" });
    await seeded(cli, async (r) => {
      const tracked = await cli.ok("attach", "--device", loop.path);
      const info0 = await cli.json<{ generationId: string; blockSize: number; blockCount: number }>(
        "cbtinfo",
        "--device",
        loop.path,
      );
      // a take advances the change number; then blocks written before the kill
      let id =
        (await cli.ok("snapshot_create", "--device", loop.path, "--file", diff, "--limit", "256M"))
          .trim();
      await cli.ok("snapshot_take", "--id", id);
      await cli.ok("snapshot_destroy", "--id", id);
      const blocks = new Set<number>();
      const f = await Deno.open(tracked, { write: true });
      for (let i = 0; i < 20; i++) {
        const block = Math.floor(r() * info0.blockCount);
        blocks.add(block);
        await f.seek(block * info0.blockSize, Deno.SeekMode.Start);
        await f.write(pseudoRandomBytes(SEED + i, 4096));
      }
      await f.sync();
      f.close();
      await killDaemon(cli);
      await revive(cli, loop.path);
      const info1 = await cli.json<{ generationId: string; changesNumber: number }>(
        "cbtinfo",
        "--device",
        loop.path,
      );
      assertEquals(info1.generationId, info0.generationId, "the generation id survives SIGKILL");
      // the next take freezes the live map: every block written before the kill is marked
      id =
        (await cli.ok("snapshot_create", "--device", loop.path, "--file", diff, "--limit", "256M"))
          .trim();
      await cli.ok("snapshot_take", "--id", id);
      const file = "/tmp/crash-cbt.map";
      await cli.ok("readcbtmap", "--device", loop.path, "--file", file);
      const map = await Deno.readFile(file);
      await Deno.remove(file);
      const info2 = await cli.json<{ changesNumber: number }>("cbtinfo", "--device", loop.path);
      for (const b of blocks) {
        assertEquals(map[b], info2.changesNumber, `block ${b} written before the kill is marked`);
      }
      await cli.ok("snapshot_destroy", "--id", id);
      await cli.ok("detach", "--device", loop.path);
    }).finally(async () => {
      await cli.run("detach", "--device", loop.path);
      await cli.stopDaemon().catch(() => {});
      await loop.destroy();
      await Deno.remove(diff, { recursive: true }).catch(() => {});
    });
    assertNoUblkDevices();
  },
);

vmTest("SIGKILL while a take holds the filesystem frozen: the next daemon thaws it", async () => {
  // Only this daemon pauses its takes while frozen (the variable reaches it through autostart).
  const cli = new EnvCli("crash-frozen", { BLKSNAP_FAULT_TAKE_FROZEN_MS: "12000" });
  const plain = new Cli("crash-frozen");
  const loop = await Loop.create(64);
  const diff = await Deno.makeTempDir({ dir: "/tmp" });
  const mnt = await Deno.makeTempDir({ dir: "/tmp" });
  let mounted = false;
  try {
    const tracked = await cli.ok("attach", "--device", loop.path);
    await sh("mkfs.ext4", "-q", "-F", tracked);
    await sh("mount", tracked, mnt);
    mounted = true;
    const data = pseudoRandomBytes(SEED, 1 << 20);
    await Deno.writeFile(`${mnt}/before`, data);
    await sh("sync");
    const id = (await cli.ok(
      "snapshot_create",
      "--device",
      loop.path,
      "--file",
      diff,
      "--limit",
      "64M",
    )).trim();
    const take = cli.run("snapshot_take", "--id", id);
    // frozen: a write that does not finish within a second (writes to a frozen
    // filesystem sleep uninterruptibly until the thaw, so it is not waited for)
    let frozen = false;
    const probes: Deno.ChildProcess[] = [];
    for (let i = 0; i < 20 && !frozen; i++) {
      const p = new Deno.Command("dd", {
        args: ["if=/dev/zero", `of=${mnt}/probe-${i}`, "bs=4096", "count=1", "conv=fsync"],
        stdout: "null",
        stderr: "null",
      }).spawn();
      probes.push(p);
      frozen = await Promise.race([p.status.then(() => false), sleep(1000).then(() => true)]);
      if (!frozen) await sleep(200);
    }
    assert(frozen, "the take froze the filesystem");
    await killDaemon(plain);
    await take;
    // a command without the fault variable starts the next daemon
    const s = await revive(plain, loop.path);
    assertEquals(s.devices.map((d) => d.tracked), [tracked]);
    assert(s.recovery?.lostSnapshots.some((x) => x.id === id), "the snapshot is reported lost");
    const probe = await run("timeout", [
      "60",
      "dd",
      "if=/dev/zero",
      `of=${mnt}/after`,
      "bs=4096",
      "count=1",
      "conv=fsync",
      "status=none",
    ]);
    assertEquals(probe.code, 0, `a write after the kill: ${probe.stderr}`);
    for (const p of probes) assertEquals((await p.status).code, 0, "the blocked writes finish");
    assertMatch(daemonLog(plain), /was being taken: .* thawed/);
    assertEquals(await Deno.readFile(`${mnt}/before`), data);
    await plain.run("snapshot_destroy", "--id", id);
    await sh("umount", mnt);
    mounted = false;
    await sh("e2fsck", "-fn", tracked);
    await plain.ok("detach", "--device", loop.path);
    await sh("e2fsck", "-fn", loop.path);
  } catch (err) {
    console.error(`BLKSNAP_CRASH_SEED=${SEED}`);
    console.error(daemonLog(plain).split("\n").slice(-60).join("\n"));
    throw err;
  } finally {
    if (mounted) await run("umount", [mnt]);
    await plain.run("detach", "--device", loop.path);
    await plain.stopDaemon().catch(() => {});
    await loop.destroy();
    await Deno.remove(diff, { recursive: true }).catch(() => {});
    await Deno.remove(mnt, { recursive: true }).catch(() => {});
  }
  assertNoUblkDevices();
});
