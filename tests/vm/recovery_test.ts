/**
 * The daemon dies; the tracked device does not. SIGKILL of the daemon under
 * a mounted ext4 written with fsync: the next command starts a daemon that
 * takes the quiesced device over, the writer finishes with no error and every
 * acknowledged file is intact. No second device over one original, with or
 * without the state file; two commands with no daemon start one. Runs inside
 * the VM.
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
  pseudoRandomBytes,
  run,
  sh,
  sha256,
  sha256Of,
  sleep,
  ublkNodes,
  vmTest,
  withDaemonLog,
} from "./_helpers.ts";
import type { RecoveryReport, StatusResult } from "../../lib/daemon/protocol.ts";

type Status = StatusResult & { running: boolean };

const FILE_BYTES = 256 * 1024;

/**
 * A program that writes `count` files into `dir`, each fsynced, and prints
 * "ack I MS" once file I is durable (MS: Date.now() right after the fsync).
 * File I holds pseudoRandomBytes(seed + I, FILE_BYTES).
 */
function writerScript(dir: string, seed: number, count: number): string {
  const helpers = new URL("./_helpers.ts", import.meta.url).href;
  return `
    import { pseudoRandomBytes } from ${JSON.stringify(helpers)};
    for (let i = 0; i < ${count}; i++) {
      const f = Deno.openSync(${JSON.stringify(dir)} + "/w" + i + ".bin",
        { write: true, create: true, truncate: true });
      const data = pseudoRandomBytes(${seed} + i, ${FILE_BYTES});
      let off = 0;
      while (off < data.length) off += f.writeSync(data.subarray(off));
      f.syncSync();
      f.close();
      console.log("ack " + i + " " + Date.now());
    }`;
}

interface Writer {
  /** Times (ms since the epoch) at which each file was acknowledged, by index. */
  acks: number[];
  done: Promise<{ code: number; stderr: string }>;
}

function startWriter(dir: string, seed: number, count: number): Writer {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["eval", writerScript(dir, seed, count)],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const acks: number[] = [];
  const readOut = (async () => {
    let buf = "";
    for await (const chunk of child.stdout.pipeThrough(new TextDecoderStream())) {
      buf += chunk;
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const m = /^ack (\d+) (\d+)$/.exec(buf.slice(0, nl));
        buf = buf.slice(nl + 1);
        if (m) acks[Number(m[1])] = Number(m[2]);
      }
    }
  })();
  const readErr = new Response(child.stderr).text();
  const done = (async () => {
    const status = await child.status;
    await readOut;
    return { code: status.code, stderr: await readErr };
  })();
  return { acks, done };
}

async function waitFor(what: string, cond: () => boolean, timeoutMs = 300_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

/** SIGKILLs the daemon; returns its pid and the time of the kill (ms since the epoch). */
async function killDaemon(cli: Cli): Promise<{ pid: number; at: number }> {
  const st = await cli.json<Status>("status");
  assert(st.running && st.pid > 0, "a daemon runs");
  Deno.kill(st.pid, "SIGKILL");
  const at = Date.now();
  await waitFor(`daemon ${st.pid} to die`, () => {
    try {
      // A zombie still has its /proc entry; "Z" in stat is dead enough.
      return /\) Z /.test(Deno.readTextFileSync(`/proc/${st.pid}/stat`));
    } catch {
      return true;
    }
  });
  return { pid: st.pid, at };
}

/** A loop device with no file behind it (its node stays, with size 0). */
function loopDetached(path: string): boolean {
  try {
    return Deno.readTextFileSync(`/sys/block/${path.slice(5)}/size`).trim() === "0";
  } catch {
    return true;
  }
}

function exists(path: string): boolean {
  try {
    Deno.statSync(path);
    return true;
  } catch {
    return false;
  }
}

/** Live (not zombie) processes running `blksnap daemon` on `socket`. */
function daemonsOn(socket: string): number[] {
  const pids: number[] = [];
  for (const e of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(e.name)) continue;
    try {
      const argv = Deno.readTextFileSync(`/proc/${e.name}/cmdline`).split("\0");
      const stat = Deno.readTextFileSync(`/proc/${e.name}/stat`);
      if (argv.includes("daemon") && argv.includes(socket) && !/\) Z /.test(stat)) {
        pids.push(Number(e.name));
      }
    } catch {
      // exited meanwhile
    }
  }
  return pids;
}

async function checkWrittenFiles(dir: string, seed: number, count: number): Promise<void> {
  for (let i = 0; i < count; i++) {
    assertEquals(
      await sha256(`${dir}/w${i}.bin`),
      await sha256Of(pseudoRandomBytes(seed + i, FILE_BYTES)),
      `file w${i}.bin`,
    );
  }
}

vmTest(
  "SIGKILL of the daemon under a mounted ext4 written with fsync: the next command recovers it, nothing fails",
  async () => {
    const cli = new Cli("recover-kill");
    const loop = await Loop.create(256);
    const mnt = "/mnt/recover-kill";
    const COUNT = 120;
    const SEED = 4242;
    // Only this test's kernel messages count: earlier tests fail image I/O on purpose.
    const since = Number((await Deno.readTextFile("/proc/uptime")).split(" ")[0]);
    let mounted = false;
    try {
      await withDaemonLog(cli, async () => {
        const tracked = await cli.ok("attach", "--device", loop.path);
        assertMatch(tracked, /^\/dev\/ublkb\d+$/);
        const before = await cli.json<Status>("status");
        const generationBefore = before.devices[0]!.cbt!.generationId;
        await sh("mkfs.ext4", "-q", "-F", tracked);
        await Deno.mkdir(mnt, { recursive: true });
        await sh("mount", tracked, mnt);
        mounted = true;

        const writer = startWriter(mnt, SEED, COUNT);
        await waitFor("10 acknowledged files", () => writer.acks.length >= 10);
        const { pid: oldPid, at: killedAt } = await killDaemon(cli);
        // (An fsync that ended as the kill came may be acknowledged just after it.)
        const settled = killedAt + 300;
        await sleep(1000);
        assertEquals(writer.acks.filter((t) => t > settled), [], "I/O waits with no daemon");
        assertEquals(ublkNodes().includes(tracked.slice(5)), true, "the device stays");

        // The next command (status never starts a daemon, except for devices left behind).
        const st = await cli.json<Status>("status");
        assert(st.running && st.pid !== oldPid, "a new daemon runs");
        const rec = st.recovery as RecoveryReport;
        assertEquals(rec.recovered.map((r) => r.tracked), [tracked]);
        assertEquals(rec.unrecovered, []);
        assertEquals(rec.previousPid, oldPid);
        assertEquals(st.devices.map((d) => d.tracked), [tracked], "status shows the device");
        // The CBT map lives in a file the dead daemon had mapped: kept, same generation.
        assertEquals(rec.recovered[0]!.cbtResetReason, null);
        assertEquals(st.devices[0]!.cbt!.generationId, generationBefore);

        await waitFor("an fsync after the kill", () => writer.acks.some((t) => t > settled));
        const flowingAt = Math.min(...writer.acks.filter((t) => t > settled));
        console.log(
          `recovery: SIGKILL to I/O flowing again ${flowingAt - killedAt} ms ` +
            `(START_USER_RECOVERY to END_USER_RECOVERY ${rec.recovered[0]!.recoveryMs} ms)`,
        );
        console.log(
          daemonLog(cli).split("\n").filter((l) => /listening|recovered/.test(l)).join("\n"),
        );

        // attach of the same original (or of the tracked device) makes no second device.
        const nodes = ublkNodes();
        for (const dev of [loop.path, tracked]) {
          const again = await cli.run("attach", "--device", dev);
          assertEquals(again.code, 1, again.stderr);
          assertMatch(again.stderr, /already tracked as|is itself the tracked device/);
        }
        assertEquals(ublkNodes(), nodes);

        const result = await writer.done;
        assertEquals(result, { code: 0, stderr: "" }, "the writer saw no error");
        assertEquals(writer.acks.length, COUNT);
        await checkWrittenFiles(mnt, SEED, COUNT);
        await sh("umount", mnt);
        mounted = false;
        await cli.ok("detach", "--device", loop.path);
        const kernelLog = (await sh("dmesg")).split("\n").filter((l) =>
          Number(/^\[\s*(\d+\.\d+)\]/.exec(l)?.[1] ?? "0") >= since
        ).join("\n");
        assert(
          !/I\/O error|EXT4-fs error/.test(kernelLog),
          `no I/O error in the kernel log:\n${kernelLog}`,
        );
        await sh("e2fsck", "-f", "-n", loop.path);
        await sh("mount", "-o", "ro", loop.path, mnt);
        try {
          await checkWrittenFiles(mnt, SEED, COUNT);
        } finally {
          await sh("umount", mnt);
        }
      });
    } finally {
      if (mounted) await run("umount", [mnt]);
      await cli.stopDaemon();
      await loop.destroy();
    }
    assertNoUblkDevices();
  },
);

vmTest(
  "without its state file, or with a corrupt one, a quiesced device still keeps its original from a second device",
  async () => {
    const cli = new Cli("recover-nostate");
    const state = "/run/blksnap-test/recover-nostate.state";
    const loop = await Loop.create(64);
    try {
      await withDaemonLog(cli, async () => {
        const tracked = await cli.ok("attach", "--device", loop.path);
        const saved = Deno.readTextFileSync(state);
        assert(saved.includes(loop.path), "the state file names the original");
        await killDaemon(cli);
        const nodes = ublkNodes();

        // Lost state file: the new daemon does not know the device, but its
        // owner tag still refuses a second device over the original.
        Deno.removeSync(state);
        const lost = await cli.run("attach", "--device", loop.path);
        assertEquals(lost.code, 1, lost.stderr);
        assertMatch(lost.stderr, new RegExp(`already backs ${tracked} \\(quiesced\\)`));
        assertEquals(ublkNodes(), nodes, "no second device");
        await cli.stopDaemon();

        // A corrupt one: reported by status, moved aside, and still no second device.
        Deno.writeTextFileSync(state, saved.slice(0, saved.length / 2));
        const torn = await cli.run("attach", "--device", loop.path);
        assertEquals(torn.code, 1, torn.stderr);
        assertMatch(torn.stderr, /already backs .*"blksnap recover" takes it over/);
        const st = await cli.json<Status>("status");
        assertMatch(st.recovery!.stateFileError ?? "", /is not valid: not JSON.*moved to/);
        assertEquals(ublkNodes(), nodes, "no second device");

        // recover finds the device by its owner tag and takes it over; detach removes it.
        const r = await cli.json<RecoveryReport>("recover");
        assertEquals(r.recovered.map((x) => x.tracked), [tracked]);
        assertEquals(r.unrecovered, []);
        const st2 = await cli.json<Status>("status");
        assertEquals(st2.devices.map((d) => d.tracked), [tracked]);
        await cli.ok("detach", "--device", loop.path);
        assertMatch(daemonLog(cli), /recovered/);
      });
    } finally {
      await cli.stopDaemon();
      await loop.destroy();
      for (const e of Deno.readDirSync("/run/blksnap-test")) {
        if (e.name.startsWith("recover-nostate.state.bad-")) {
          Deno.removeSync(`/run/blksnap-test/${e.name}`);
        }
      }
    }
    assertNoUblkDevices();
  },
);

vmTest("two commands started together with no daemon running: one daemon serves both", async () => {
  const cli = new Cli("recover-race");
  const loops = [await Loop.create(32), await Loop.create(32)];
  try {
    const [a, b] = await Promise.all(loops.map((l) => cli.run("attach", "--device", l.path)));
    assertEquals([a!.code, b!.code], [0, 0], `${a!.stderr}\n${b!.stderr}`);
    // The daemon that lost the race for the lock exits at once.
    await waitFor("one daemon", () => daemonsOn(cli.socket).length === 1, 30_000);
    await sleep(1000);
    assertEquals(daemonsOn(cli.socket).length, 1, "exactly one daemon");
    assertMatch(
      daemonLog(cli),
      /Another blksnap daemon( \(pid \d+\))? holds/,
      "the second daemon lost the race for the lock",
    );
    const st = await cli.json<Status>("status");
    assertEquals(st.devices.map((d) => d.original).sort(), loops.map((l) => l.path).sort());
    for (const l of loops) await cli.ok("detach", "--device", l.path);
  } finally {
    await cli.stopDaemon();
    for (const l of loops) await l.destroy();
  }
  assertNoUblkDevices();
});

vmTest(
  "a snapshot held when the daemon is killed is reported lost; its image is removed, the tracked device recovered",
  async () => {
    const cli = new Cli("recover-snap");
    const loop = await Loop.create(64);
    const diffDir = "/tmp/recover-snap-diff";
    await Deno.mkdir(diffDir, { recursive: true });
    try {
      await withDaemonLog(cli, async () => {
        const tracked = await cli.ok("attach", "--device", loop.path);
        const id = await cli.ok(
          "snapshot_create",
          "--device",
          loop.path,
          "--file",
          diffDir,
          "--limit",
          "64M",
        );
        const take = await cli.json<{ images: Array<{ image: string }> }>(
          "snapshot_take",
          "--id",
          id,
        );
        const image = take.images[0]!.image;
        const imageId = Number(image.replace("/dev/ublkb", ""));
        await killDaemon(cli);
        const st = await cli.json<Status>("status");
        const rec = st.recovery!;
        assertEquals(rec.lostSnapshots.map((s) => s.id), [id]);
        assertEquals(rec.removed.map((r) => [r.ublkId, r.role]), [[imageId, "image"]]);
        assertEquals(rec.recovered.map((r) => r.tracked), [tracked]);
        assertEquals(st.snapshots, []);
        assertMatch(
          await cli.ok("status"),
          new RegExp(`snapshot ${id} \\(${loop.path}\\): corrupted`),
        );
        // Its one event says so; destroying it then succeeds, as for a corrupted snapshot.
        const ev = await cli.ok("snapshot_waitevent", "--id", id, "--timeout", "1000");
        assertMatch(ev, /event=corrupted/);
        assertMatch(ev, /error_code=19/);
        await cli.ok("snapshot_destroy", "--id", id);
        await waitFor("the image to go", () => !exists(`/dev/ublkc${imageId}`), 30_000);
        assertEquals(ublkNodes(), [tracked.slice(5), `ublkc${tracked.slice(10)}`].sort());
        // The tracked device works, and the storage directory holds nothing.
        await sh("dd", "if=/dev/zero", `of=${tracked}`, "bs=64k", "count=16", "oflag=direct");
        assertEquals([...Deno.readDirSync(diffDir)], []);
        await cli.ok("detach", "--device", loop.path);
      });
    } finally {
      await cli.stopDaemon();
      await loop.destroy();
    }
    assertNoUblkDevices();
  },
);

vmTest(
  "a device whose original is gone is reported, not deleted; recover takes it over once the original is back, detach --force deletes it",
  async () => {
    const cli = new Cli("recover-gone");
    const loop = await Loop.create(64);
    let loopPath = loop.path;
    try {
      await withDaemonLog(cli, async () => {
        const tracked = await cli.ok("attach", "--device", loopPath);
        // 2 MiB at 8 MiB: the CBT map must still say so after the recovery.
        await sh(
          "dd",
          "if=/dev/urandom",
          `of=${tracked}`,
          "bs=64k",
          "count=32",
          "seek=128",
          "oflag=direct",
        );
        const cbtBefore = await cli.json<{ generationId: string; blockSize: number }>(
          "cbtinfo",
          "--device",
          loopPath,
        );
        const sum = await sha256Of(await Deno.readFile(loop.file));
        await killDaemon(cli);
        // The original goes away while no daemon holds it.
        await sh("losetup", "-d", loopPath);
        await waitFor("the loop device to detach", () => loopDetached(loopPath));

        const st = await cli.json<Status>("status");
        assertEquals(st.recovery!.recovered, []);
        assertEquals(st.recovery!.unrecovered.map((u) => u.tracked), [tracked]);
        assertMatch(
          await cli.ok("status"),
          new RegExp(`NOT recovered: ${tracked} over ${loopPath}`),
        );
        assert(exists(tracked), "left as the kernel has it");
        const none = await cli.run("recover");
        assertEquals(none.code, 1, "still not recoverable");

        // The original is back (same file, same number): recover takes the device over.
        await sh("losetup", loopPath, loop.file);
        const r = await cli.json<RecoveryReport>("recover");
        assertEquals(r.unrecovered, []);
        assertEquals(r.recovered.map((x) => x.tracked), [tracked]);
        assertEquals(await sha256(tracked), sum, "the data through the recovered device");
        assertEquals(r.recovered[0]!.cbtResetReason, null);
        // The map kept its generation and the marks made before the kill: a take
        // freezes it into the read map that readcbtmap returns.
        const cbtAfter = await cli.json<{ generationId: string }>("cbtinfo", "--device", loopPath);
        assertEquals(cbtAfter.generationId, cbtBefore.generationId);
        const diffDir = "/tmp/recover-gone-diff";
        await Deno.mkdir(diffDir, { recursive: true });
        const id = await cli.ok(
          "snapshot_create",
          "--device",
          loopPath,
          "--file",
          diffDir,
          "--limit",
          "16M",
        );
        await cli.ok("snapshot_take", "--id", id);
        await cli.ok("snapshot_destroy", "--id", id);
        await cli.ok("readcbtmap", "--device", loopPath, "--file", "/tmp/recover-gone.map");
        const map = await Deno.readFile("/tmp/recover-gone.map");
        const bs = cbtBefore.blockSize;
        const first = Math.floor((8 << 20) / bs);
        const last = Math.floor(((10 << 20) - 1) / bs);
        for (let b = first; b <= last; b++) assert(map[b]! >= 1, `block ${b} is marked`);
        assertEquals(map[Math.floor((40 << 20) / bs)], 0, "a block never written is not marked");

        // Left unrecovered once more, detach --force deletes it.
        await killDaemon(cli);
        await sh("losetup", "-d", loopPath);
        await waitFor("the loop device to detach", () => loopDetached(loopPath));
        const gone = await cli.run("detach", "--device", tracked);
        assertEquals(gone.code, 1, "plain detach does not delete it");
        await cli.ok("detach", "--device", tracked, "--force");
        await waitFor("the device to go", () => !exists(tracked), 30_000);
        assertEquals((await cli.json<Status>("status")).recovery!.unrecovered, []);
        loopPath = await sh("losetup", "--find", "--show", loop.file);
        assertEquals(await sha256Of(await Deno.readFile(loop.file)), sum);
      });
    } finally {
      await cli.stopDaemon();
      await run("losetup", ["-d", loopPath]);
      await Deno.remove(loop.file).catch(() => {});
    }
    assertNoUblkDevices();
  },
);

vmTest(
  "SIGKILL during attach: the next attach of the original removes the half-made device and succeeds",
  async () => {
    const cli = new Cli("recover-attach");
    const loop = await Loop.create(32);
    try {
      await withDaemonLog(cli, async () => {
        // A daemon first, so that the attach below is only the attach.
        await cli.ok("attach", "--device", loop.path);
        await cli.ok("detach", "--device", loop.path);
        const st = await cli.json<Status>("status");
        const attach = cli.run("attach", "--device", loop.path);
        // Between ADD_DEV (the char device exists) and START_DEV (the disk appears).
        await waitFor("ADD_DEV", () => ublkNodes().some((n) => n.startsWith("ublkc")), 60_000);
        const half = ublkNodes();
        Deno.kill(st.pid, "SIGKILL");
        const r = await attach;
        assertEquals(r.code, 3, `the attach learns that the daemon went away: ${r.stderr}`);
        const second = await cli.run("attach", "--device", loop.path);
        let again: string;
        if (second.code === 0) {
          again = second.stdout.trim();
        } else {
          // The disk was up before the kill: the new daemon recovered it instead.
          const m = /already tracked as "(\/dev\/ublkb\d+)"/.exec(second.stderr);
          assert(m, second.stderr);
          again = m[1]!;
          console.log(`(killed after START_DEV: the device was recovered; ${half.join(" ")})`);
        }
        assertMatch(again, /^\/dev\/ublkb\d+$/);
        const st2 = await cli.json<Status>("status");
        assertEquals(st2.devices.map((d) => d.tracked), [again]);
        assertEquals(
          ublkNodes(),
          [again.slice(5), `ublkc${again.slice(10)}`].sort(),
          "one device, nothing half-made left",
        );
        await cli.ok("detach", "--device", loop.path);
      });
    } finally {
      await cli.stopDaemon();
      await loop.destroy();
    }
    assertNoUblkDevices();
  },
);
