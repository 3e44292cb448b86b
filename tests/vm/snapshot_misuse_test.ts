/**
 * Wrong calls of the snapshot and CBT commands on a real kernel: each gets a
 * clear message on stderr and a non-zero exit, the daemon keeps serving, and
 * the state (status --json, apart from counters) does not change. A
 * snapshot_watcher in the background exits 0 when its snapshot is destroyed.
 * Runs inside the VM.
 */
import {
  deepStrictEqual as assertEquals,
  match as assertMatch,
  ok as assert,
} from "node:assert/strict";
import {
  assertNoUblkDevices,
  daemonRequest,
  EnvCli,
  Loop,
  MAIN,
  run,
  sh,
  stopwatch,
  ublkNodes,
  vmTest,
  withDaemonLog,
} from "./_helpers.ts";
import type { StatusResult } from "../../lib/daemon/protocol.ts";

/** status without what moves by itself (I/O counters, copy-on-write counters, fill). */
async function state(cli: EnvCli): Promise<unknown> {
  const st = await daemonRequest<StatusResult>(cli, "status", {});
  const strip = (o: Record<string, unknown>, keys: string[]) => {
    const out = { ...o };
    for (const k of keys) delete out[k];
    return out;
  };
  return {
    ...strip(st as unknown as Record<string, unknown>, ["foreignDevices"]),
    devices: st.devices.map((d) => strip(d as unknown as Record<string, unknown>, ["queueStats"])),
    snapshots: (st.snapshots ?? []).map((s) => ({
      ...s,
      devices: s.devices.map((d) => ({
        original: d.original,
        tracked: d.tracked,
        image: d.image,
      })),
      storage: strip(s.storage as unknown as Record<string, unknown>, ["filledBytes"]),
    })),
  };
}

interface Case {
  args: string[];
  code: number;
  message: RegExp;
  stdout?: RegExp;
}

vmTest(
  "snapshot and CBT misuse: clear errors, non-zero exits, no change of state",
  async () => {
    const cli = new EnvCli("misuse", { BLKSNAP_DAEMON_ARGS: "--diff-storage-minimum=8192" });
    const lap = stopwatch("misuse");
    const a = await Loop.create(32); // ext4, in snapshot S1 (taken), its image mounted
    const b = await Loop.create(32); // raw, in snapshot S2 (not taken)
    const c = await Loop.create(32); // never attached
    const d = await Loop.create(16); // S2's difference storage (a block device)
    const f = await Loop.create(32); // ext4 holding S3's difference storage; in no snapshot
    const mnt = { a: "/mnt/misuse-a", f: "/mnt/misuse-f", img: "/mnt/misuse-img" };
    const mounted: string[] = [];
    let watcher: Deno.ChildProcess | undefined;
    try {
      await withDaemonLog(cli, async () => {
        const ta = await cli.ok("attach", "--device", a.path);
        const tb = await cli.ok("attach", "--device", b.path);
        const tf = await cli.ok("attach", "--device", f.path);
        for (const [t, m] of [[ta, mnt.a], [tf, mnt.f]] as const) {
          await sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", t);
          await Deno.mkdir(m, { recursive: true });
          await sh("mount", t, m);
          mounted.push(m);
        }
        await Deno.writeFile(`${mnt.a}/hello.txt`, new TextEncoder().encode("hello\n"));
        await Deno.mkdir("/tmp/misuse-diff", { recursive: true });
        await Deno.mkdir(`${mnt.f}/diff`, { recursive: true });
        const create = (...args: string[]) => cli.ok("snapshot_create", ...args, "--limit", "16M");
        const s1 = await create("--device", a.path, "--file", "/tmp/misuse-diff");
        await cli.ok("snapshot_take", "--id", s1);
        const img = await cli.ok("snapshot_info", "--device", a.path, "--field", "image");
        await Deno.mkdir(mnt.img, { recursive: true });
        await sh("mount", "-o", "ro", img, mnt.img);
        mounted.push(mnt.img);
        const s2 = await create("--device", b.path, "--file", d.path);
        const s3 = await create("--file", `${mnt.f}/diff`);
        watcher = new Deno.Command(Deno.execPath(), {
          args: ["run", "-A", "--quiet", MAIN, "snapshot_watcher", "--id", s2],
          env: { BLKSNAP_SOCKET: cli.socket },
          stdin: "null",
          stdout: "piped",
          stderr: "piped",
        }).spawn();
        lap("set up");

        const before = await state(cli);
        const nodes = ublkNodes();
        const ids = [s1, s2, s3].sort();
        const random = crypto.randomUUID();
        const [cmaj, cmin] = (await Deno.readTextFile(`/sys/block/${c.path.slice(5)}/dev`))
          .trim().split(":");
        const sectors = 32 * 1024 * 1024 / 512;
        const notFound = /[Ss]napshot [0-9a-f-]{36} not found/;
        const notTracked = /is not tracked/;
        const cases: Case[] = [
          // an id that names no snapshot
          { args: ["snapshot_take", "--id", random], code: 1, message: notFound },
          { args: ["snapshot_destroy", "--id", random], code: 1, message: notFound },
          {
            args: ["snapshot_add", "--id", random, "--device", c.path],
            code: 1,
            message: notFound,
          },
          {
            args: ["snapshot_waitevent", "--id", random, "--timeout", "100"],
            code: 1,
            message: notFound,
            stdout: /^result=not found\n$/,
          },
          // malformed ids
          {
            args: ["snapshot_take", "--id", "not-a-uuid"],
            code: 2,
            message: /must be a snapshot UUID/,
          },
          {
            args: ["snapshot_destroy", "--id", `${s1}0`],
            code: 2,
            message: /must be a snapshot UUID/,
          },
          {
            args: ["snapshot_add", "--id", "", "--device", b.path],
            code: 2,
            message: /--id is required/,
          },
          {
            args: ["snapshot_waitevent", "--id", "1234", "--timeout", "100"],
            code: 2,
            message: /must be a snapshot UUID/,
          },
          { args: ["snapshot_watcher", "--id", "x"], code: 2, message: /must be a snapshot UUID/ },
          { args: ["snapshot_take"], code: 2, message: /--id is required/ },
          // a device never attached
          { args: ["cbtinfo", "--device", c.path], code: 1, message: notTracked },
          {
            args: ["cbtinfo", "--device", `/dev/block/${cmaj}:${cmin}`],
            code: 1,
            message: notTracked,
          },
          {
            args: ["readcbtmap", "--device", c.path, "--file", "/tmp/misuse.map"],
            code: 1,
            message: notTracked,
          },
          {
            args: ["markdirtyblock", "--device", c.path, "--range", "0:8"],
            code: 1,
            message: notTracked,
          },
          { args: ["snapshot_info", "--device", c.path], code: 1, message: notTracked },
          // twice in a row
          { args: ["snapshot_take", "--id", s1], code: 1, message: /already taken/ },
          {
            args: ["snapshot_add", "--id", s1, "--device", c.path],
            code: 1,
            message: /already taken/,
          },
          {
            args: ["snapshot_add", "--id", s2, "--device", tb],
            code: 1,
            message: /already in snapshot/,
          },
          {
            args: ["snapshot_add", "--id", s3, "--device", a.path],
            code: 1,
            message: /already in snapshot/,
          },
          {
            args: [
              "snapshot_create",
              "--device",
              ta,
              "--file",
              "/tmp/misuse-diff",
              "--limit",
              "16M",
            ],
            code: 1,
            message: new RegExp(`already in snapshot ${s1}`),
          },
          {
            args: [
              "snapshot_create",
              "--device",
              tf,
              f.path,
              "--file",
              "/tmp/misuse-diff",
              "--limit",
              "16M",
            ],
            code: 1,
            message: /given twice/,
          },
          // a snapshot with no devices
          { args: ["snapshot_take", "--id", s3], code: 1, message: /has no devices/ },
          // an image in use, a device in a snapshot
          { args: ["snapshot_destroy", "--id", s1], code: 1, message: /in use|mounted/ },
          {
            args: ["detach", "--device", a.path],
            code: 1,
            message: new RegExp(`is in snapshot ${s1}`),
          },
          {
            args: ["detach", "--device", tb],
            code: 1,
            message: new RegExp(`is in snapshot ${s2}`),
          },
          // the device that holds the difference storage
          {
            args: ["snapshot_add", "--id", s3, "--device", f.path],
            code: 1,
            message: /which is in the snapshot/,
          },
          {
            args: ["snapshot_create", "--device", tf, "--file", `${mnt.f}/diff`, "--limit", "16M"],
            code: 1,
            message: /which is in the snapshot/,
          },
          {
            args: [
              "snapshot_create",
              "--device",
              d.path,
              "--file",
              "/tmp/misuse-diff",
              "--limit",
              "16M",
            ],
            code: 1,
            message: /in use/,
          },
          {
            args: ["snapshot_create", "--device", f.path, "--file", d.path, "--limit", "16M"],
            code: 1,
            message: /in use/,
          },
          {
            args: ["snapshot_create", "--device", f.path, "--file", tf, "--limit", "16M"],
            code: 1,
            message: /in use|in the snapshot/,
          },
          // limit 0, a storage that does not exist
          {
            args: [
              "snapshot_create",
              "--device",
              f.path,
              "--file",
              "/tmp/misuse-diff",
              "--limit",
              "0",
            ],
            code: 1,
            message: /limit must be more than 0/,
          },
          {
            args: [
              "snapshot_create",
              "--device",
              f.path,
              "--file",
              "/tmp/misuse-none",
              "--limit",
              "16M",
            ],
            code: 1,
            message: /does not exist/,
          },
          // ranges past the end
          {
            args: ["markdirtyblock", "--device", tb, "--range", `${sectors - 1}:2`],
            code: 1,
            message: /past the end/,
          },
          {
            args: ["markdirtyblock", "--device", tb, "--range", `0:8`, `${sectors}:1`],
            code: 1,
            message: /past the end/,
          },
          {
            args: ["markdirtyblock", "--device", tb, "--range", "5:0"],
            code: 2,
            message: /count >= 1/,
          },
          // last: an untracked device that the failed create attaches first (invariant 7: no
          // change of state, so it must not stay attached)
          {
            args: [
              "snapshot_create",
              "--device",
              c.path,
              c.path,
              "--file",
              "/tmp/misuse-diff",
              "--limit",
              "16M",
            ],
            code: 1,
            message: /given twice/,
          },
          {
            args: [
              "snapshot_create",
              "--device",
              c.path,
              a.path,
              "--file",
              "/tmp/misuse-diff",
              "--limit",
              "16M",
            ],
            code: 1,
            message: /already in snapshot/,
          },
        ];
        for (const c of cases) {
          const what = c.args.join(" ");
          const r = await cli.run(...c.args);
          assertEquals(r.code, c.code, `${what}: exit ${r.code}\n${r.stdout}${r.stderr}`);
          assertMatch(r.stderr, /^blksnap: /, `${what}: ${r.stderr}`);
          assertMatch(r.stderr, c.message, `${what}: ${r.stderr}`);
          assert(!r.stderr.includes("    at "), `${what}: no stack trace: ${r.stderr}`);
          assertMatch(r.stdout, c.stdout ?? /^$/, `${what}: stdout ${r.stdout}`);
          assertEquals(await state(cli), before, `${what}: the state changed`);
          assertEquals(ublkNodes(), nodes, `${what}: devices made or removed`);
        }
        lap(`${cases.length} cases`);
        assertEquals((await cli.ok("snapshot_collect")).split("\n").sort(), ids);
        assertEquals([...Deno.readDirSync(`${mnt.f}/diff`)], [], "no file left in a storage dir");
        await Deno.stat("/tmp/misuse.map").then(
          () => assert(false, "a failed readcbtmap left its file"),
          () => {},
        );

        // The watcher of S2 exits 0 when S2 is destroyed.
        await cli.ok("snapshot_destroy", "--id", s2);
        const w = await watcher.output();
        watcher = undefined;
        const wout = new TextDecoder().decode(w.stdout);
        assertEquals(w.code, 0, `snapshot_watcher:\n${wout}${new TextDecoder().decode(w.stderr)}`);
        assertEquals(
          wout,
          "Start snapshot watcher.\nSnapshot not found\nSnapshot watcher finished\n",
        );
        // Destroy twice.
        const again = await cli.run("snapshot_destroy", "--id", s2);
        assertEquals(again.code, 1, again.stderr);
        assertMatch(again.stderr, notFound);

        await sh("umount", mnt.img);
        mounted.splice(mounted.indexOf(mnt.img), 1);
        await cli.ok("snapshot_destroy", "--id", s1);
        await cli.ok("snapshot_destroy", "--id", s3);
        assertEquals(await cli.ok("snapshot_collect"), "");
        for (const m of mounted.splice(0)) await sh("umount", m);
        for (const l of [a, b, f]) await cli.ok("detach", "--device", l.path);
        await cli.stopDaemon();
        assertNoUblkDevices();
      });
    } finally {
      if (watcher) {
        try {
          watcher.kill("SIGKILL");
        } catch {
          // gone already
        }
        await watcher.status;
      }
      // After a failure: the image first, then the snapshots (S3's storage is open on
      // the ext4 of F, which cannot be unmounted before), then the filesystems.
      if (mounted.includes(mnt.img)) await run("umount", [mnt.img]);
      try {
        const { ids } = await daemonRequest<{ ids: string[] }>(cli, "snapshot_collect", {});
        for (const id of ids) await daemonRequest(cli, "snapshot_destroy", { id }).catch(() => {});
      } catch {
        // no daemon
      }
      for (const m of mounted.reverse()) if (m !== mnt.img) await run("umount", [m]);
      await cli.stopDaemon().catch(() => {});
      for (const l of [a, b, c, d, f]) await l.destroy();
    }
  },
);
