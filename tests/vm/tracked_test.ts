/**
 * Tracked devices on a real kernel: ext4 through ublk, fio with verification,
 * several devices, attach/detach cycles. Runs inside the VM (tools/vm.sh test).
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
  ublkNodes,
  vmTest,
} from "./_helpers.ts";
import { BLK, O, openLibc } from "../../ffi/libc.ts";

interface Status {
  running: boolean;
  devices: Array<{
    original: string;
    tracked: string;
    sizeBytes: number;
    queues: number;
    queueDepth: number;
    queueStats: Array<{ requests: number; writes: number; reads: number }>;
  }>;
}

vmTest(
  "ext4 on a tracked device: files written through ublk read back from the original",
  async () => {
    const cli = new Cli("ext4");
    const loop = await Loop.create(256);
    try {
      const tracked = await cli.ok("attach", "--device", loop.path);
      assertMatch(tracked, /^\/dev\/ublkb\d+$/);
      const st = await cli.json<Status>("status");
      assertEquals(st.devices.length, 1);
      assertEquals(st.devices[0]!.sizeBytes, 256 * 1024 * 1024);
      assertEquals(st.devices[0]!.queues, 2);
      assertEquals(st.devices[0]!.queueDepth, 128);

      await sh("mkfs.ext4", "-q", "-F", tracked);
      await Deno.mkdir("/mnt/t", { recursive: true });
      await sh("mount", tracked, "/mnt/t");
      const sums = new Map<string, string>();
      for (let i = 0; i < 24; i++) {
        const size = [4096, 65536, 1 << 20, 3 * (1 << 20) + 517][i % 4]!;
        const name = `/mnt/t/file${i}.bin`;
        await Deno.writeFile(name, pseudoRandomBytes(1000 + i, size));
        sums.set(`file${i}.bin`, await sha256(name));
      }
      await sh("sync");
      await sh("umount", "/mnt/t");

      const busy = await cli.run("detach", "--device", loop.path);
      assertEquals(busy.code, 0, `detach failed: ${busy.stderr}`);
      assertEquals(ublkNodes(), []);

      await sh("e2fsck", "-f", "-n", loop.path);
      await sh("mount", "-o", "ro", loop.path, "/mnt/t");
      try {
        for (const [name, sum] of sums) assertEquals(await sha256(`/mnt/t/${name}`), sum, name);
      } finally {
        await sh("umount", "/mnt/t");
      }
    } finally {
      await cli.stopDaemon();
      await loop.destroy();
    }
    assertNoUblkDevices();
  },
);

vmTest(
  "fio crc32c verify through the tracked device, both queues, then read back from the original",
  async () => {
    const cli = new Cli("fio");
    const loop = await Loop.create(192);
    try {
      const tracked = await cli.ok("attach", "--device", loop.path);
      const common = [
        "--ioengine=io_uring",
        "--direct=1",
        "--iodepth=32",
        "--numjobs=2",
        "--cpus_allowed_policy=split",
        "--cpus_allowed=0-1",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--group_reporting",
        "--offset_increment=96M",
        "--size=96M",
      ];
      const jobs = [
        ["--name=rand4k", "--rw=randwrite", "--bs=4k", "--number_ios=6000"],
        ["--name=seq1m", "--rw=write", "--bs=1M"],
      ];
      for (const job of jobs) {
        await sh("fio", `--filename=${tracked}`, ...common, ...job);
        const st = await cli.json<Status>("status");
        const q = st.devices[0]!.queueStats;
        assert(q.length === 2, "two queues");
        assert(
          q[0]!.writes > 0 && q[1]!.writes > 0,
          `both queues must serve writes: ${JSON.stringify(q)}`,
        );
        // The same data, read back and verified through the original.
        await cli.ok("detach", "--device", tracked);
        await sh("fio", `--filename=${loop.path}`, ...common, ...job, "--verify_only");
        if (job !== jobs.at(-1)) await cli.ok("attach", "--device", loop.path);
      }
    } finally {
      await cli.stopDaemon();
      await loop.destroy();
    }
    assertNoUblkDevices();
  },
);

vmTest(
  "two tracked devices at once, then ten attach/detach cycles leave nothing behind",
  async () => {
    const cli = new Cli("multi");
    const a = await Loop.create(64);
    const b = await Loop.create(96);
    try {
      const ta = await cli.ok("attach", "-d", a.path);
      const tb = await cli.ok("attach", "--device=" + b.path);
      assert(ta !== tb);
      const da = pseudoRandomBytes(7, 1 << 20);
      const db = pseudoRandomBytes(8, 1 << 20);
      await Deno.writeFile(ta, da);
      await Deno.writeFile(tb, db);
      await sh("sync");
      const st = await cli.json<Status>("status");
      assertEquals(st.devices.map((d) => d.sizeBytes).sort((x, y) => x - y), [64 << 20, 96 << 20]);
      // detach by the tracked path and by /dev/block/MAJ:MIN of the original
      const [major, minor] = (await sh("cat", `/sys/block/${b.path.slice(5)}/dev`)).split(":");
      await cli.ok("detach", "--device", ta);
      await cli.ok("detach", "--device", `/dev/block/${major}:${minor}`);
      assertEquals(ublkNodes(), []);
      const headA = (await Deno.readFile(a.path)).subarray(0, 1 << 20);
      const headB = (await Deno.readFile(b.path)).subarray(0, 1 << 20);
      assertEquals(await digest(headA), await digest(da));
      assertEquals(await digest(headB), await digest(db));

      for (let i = 0; i < 10; i++) {
        const t = await cli.ok("attach", "--device", a.path);
        assertMatch(t, /^\/dev\/ublkb\d+$/);
        await cli.ok("detach", "--device", a.path);
        assertEquals(ublkNodes(), [], `cycle ${i}`);
      }
    } finally {
      await cli.stopDaemon();
      await a.destroy();
      await b.destroy();
    }
    assertNoUblkDevices();
  },
);

vmTest("SIGTERM removes every device the daemon made", async () => {
  const cli = new Cli("sigterm");
  const a = await Loop.create(32);
  const b = await Loop.create(32);
  try {
    await cli.ok("attach", "--device", a.path);
    await cli.ok("attach", "--device", b.path);
    assertEquals(ublkNodes().length, 4);
    await cli.stopDaemon();
    assertNoUblkDevices();
    const st = await cli.json<Status>("status");
    assertEquals(st.running, false);
  } finally {
    await cli.stopDaemon();
    await a.destroy();
    await b.destroy();
  }
});

async function digest(data: Uint8Array): Promise<string> {
  const d = await crypto.subtle.digest("SHA-256", data as Uint8Array<ArrayBuffer>);
  return [...new Uint8Array(d)].map((x) => x.toString(16).padStart(2, "0")).join("");
}

vmTest(
  "a second daemon reports the first one's devices as foreign, and refuses its socket",
  async () => {
    const first = new Cli("first");
    const second = new Cli("second");
    const loop = await Loop.create(32);
    try {
      const tracked = await first.ok("attach", "--device", loop.path);
      const id = Number(tracked.replace("/dev/ublkb", ""));
      const st = await second.json<
        { foreignDevices: Array<{ ublkId: number; state: string; pid: number; pidAlive: boolean }> }
      >(
        "status",
      );
      // status does not start a daemon; attach does, on the second socket.
      assertEquals(st.foreignDevices ?? [], []);
      const r = await second.run("attach", "--device", loop.path);
      assertEquals(r.code, 1);
      assertMatch(r.stderr, /in use/);
      const st2 = await second.json<
        { foreignDevices: Array<{ ublkId: number; state: string; pid: number; pidAlive: boolean }> }
      >(
        "status",
      );
      assertEquals(st2.foreignDevices, [{
        ublkId: id,
        state: "live",
        pid: st2.foreignDevices[0]!.pid,
        pidAlive: true,
      }]);
      const text = await second.ok("status");
      assertMatch(text, new RegExp(`warning: /dev/ublkb${id} is not this daemon's: live`));
    } finally {
      await second.stopDaemon();
      await first.stopDaemon();
      await loop.destroy();
    }
    assertNoUblkDevices();
  },
);

vmTest(
  "a failing queue worker: its device is stopped and removed, I/O fails instead of hanging, the daemon serves on",
  async () => {
    const cli = new Cli("fault");
    const loop = await Loop.create(64);
    try {
      // Only this daemon's workers fail: the variable reaches it through the autostart.
      const r = await run(Deno.execPath(), [
        "run",
        "-A",
        "--quiet",
        MAIN,
        "attach",
        "--device",
        loop.path,
      ], {
        BLKSNAP_SOCKET: cli.socket,
        BLKSNAP_FAULT_QUEUE_FAIL_AFTER: "200",
      });
      assertEquals(r.code, 0, r.stderr);
      const tracked = r.stdout.trim();
      // Enough I/O to cross 200 requests on a queue; it must end, with an error, not hang.
      const dd = await run("timeout", [
        "120",
        "dd",
        `if=/dev/zero`,
        `of=${tracked}`,
        "bs=4k",
        "count=4000",
        "oflag=direct",
      ]);
      assert(dd.code !== 124, "I/O to a device with a failed queue hung");
      assert(dd.code !== 0, `dd should fail once a queue failed: ${dd.stderr}`);
      // The daemon removes the device and keeps serving.
      const deadline = Date.now() + 60_000;
      while (ublkNodes().length > 0 && Date.now() < deadline) await sleep(100);
      assertEquals(ublkNodes(), [], "device with a failed queue left behind");
      const st = await cli.json<Status>("status");
      assertEquals(st.running, true);
      assertEquals(st.devices, []);
      const log = await Deno.readTextFile(cli.socket.replace(/[^/]+$/, "daemon.log"));
      assertMatch(log, /FATAL: ublk device \d+ queue \d+ failed: .*injected failure/);
    } finally {
      await cli.stopDaemon();
      await loop.destroy();
    }
    assertNoUblkDevices();
  },
);

vmTest(
  "discard through the tracked device reaches the original, and only the discarded range",
  async () => {
    const cli = new Cli("discard");
    const loop = await Loop.create(64);
    const libc = openLibc();
    try {
      const tracked = await cli.ok("attach", "--device", loop.path);
      const data = pseudoRandomBytes(99, 16 << 20);
      const f = await Deno.open(tracked, { write: true });
      await f.write(data);
      f.syncSync();
      f.close();
      const before = Deno.statSync(loop.file).blocks!;
      assert(before >= (16 << 20) / 512, `backing file holds the data (${before} blocks)`);

      const fd = libc.open(tracked, O.RDWR | O.CLOEXEC);
      try {
        const range = new BigUint64Array([0n, BigInt(8 << 20)]);
        libc.check(
          libc.sym.ioctl(fd, BLK.BLKDISCARD, new Uint8Array(range.buffer)),
          "ioctl(BLKDISCARD)",
        );
      } finally {
        libc.close(fd);
      }
      const after = Deno.statSync(loop.file).blocks!;
      // The loop device over tmpfs punches the discarded range out of its file.
      assert(
        before - after >= (8 << 20) / 512,
        `discard did not reach the original: ${before} -> ${after} blocks`,
      );
      const back = await Deno.readFile(tracked);
      assert(
        back.subarray(0, 8 << 20).every((b) => b === 0),
        "discarded range reads back as zeroes here",
      );
      assertEquals(
        await digest(back.subarray(8 << 20, 16 << 20)),
        await digest(data.subarray(8 << 20)),
      );
      const st = await cli.json<
        { devices: Array<{ queueStats: Array<{ discards: number; errors: number }> }> }
      >(
        "status",
      );
      const q = st.devices[0]!.queueStats;
      assert(q.reduce((a, x) => a + x.discards, 0) > 0, "the queues served discards");
      assertEquals(q.reduce((a, x) => a + x.errors, 0), 0);
      await cli.ok("detach", "--device", loop.path);
    } finally {
      libc.unload();
      await cli.stopDaemon();
      await loop.destroy();
    }
    assertNoUblkDevices();
  },
);
