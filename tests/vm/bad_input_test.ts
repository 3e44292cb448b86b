/**
 * Bad input gets a clear message, a non-zero exit, and no change of state;
 * the daemon keeps serving. Runs inside the VM.
 */
import {
  deepStrictEqual as assertEquals,
  match as assertMatch,
  ok as assert,
} from "node:assert/strict";
import { assertNoUblkDevices, Cli, Loop, sh, ublkNodes, vmTest } from "./_helpers.ts";

vmTest("bad input: clear errors, non-zero exits, daemon still serving", async () => {
  const cli = new Cli("bad");
  const loop = await Loop.create(32);
  const other = await Loop.create(32);
  try {
    const tracked = await cli.ok("attach", "--device", loop.path);
    const before = ublkNodes();

    const cases: Array<{ args: string[]; code: number; message: RegExp }> = [
      {
        args: ["attach", "--device", "/dev/nonexistent"],
        code: 1,
        message: /no such file or directory/,
      },
      {
        args: ["attach", "--device", loop.file],
        code: 1,
        message: /regular file, not a block device/,
      },
      { args: ["attach", "--device", "/tmp"], code: 1, message: /directory, not a block device/ },
      {
        args: ["attach", "--device", loop.path],
        code: 1,
        message: /already tracked as "\/dev\/ublkb\d+"/,
      },
      {
        args: ["attach", "--device", tracked],
        code: 1,
        message: /is itself the tracked device of/,
      },
      { args: ["detach", "--device", other.path], code: 1, message: /is not tracked/ },
      { args: ["detach", "--device", "/dev/nonexistent"], code: 1, message: /no such file/ },
      { args: ["attach"], code: 2, message: /--device is required/ },
      { args: ["attach", "--device"], code: 2, message: /argument missing|requires|expects/i },
      { args: ["attach", "--frobnicate"], code: 2, message: /Unknown option '--frobnicate'/ },
      { args: ["frobnicate"], code: 2, message: /Unknown command "frobnicate"/ },
      {
        args: ["attach", "-d", loop.path, "extra"],
        code: 2,
        message: /unexpected argument "extra"/,
      },
    ];
    for (const c of cases) {
      const r = await cli.run(...c.args);
      assertEquals(r.code, c.code, `${c.args.join(" ")}: exit ${r.code}\n${r.stderr}`);
      assertMatch(r.stderr, c.message, `${c.args.join(" ")}: ${r.stderr}`);
      assert(!r.stderr.includes("    at "), `no stack trace for ${c.args.join(" ")}: ${r.stderr}`);
      assertEquals(ublkNodes(), before, `state changed by ${c.args.join(" ")}`);
    }

    // A device mounted elsewhere: O_EXCL refuses it.
    await sh("mkfs.ext4", "-q", "-F", other.path);
    await Deno.mkdir("/mnt/other", { recursive: true });
    await sh("mount", other.path, "/mnt/other");
    try {
      const r = await cli.run("attach", "--device", other.path);
      assertEquals(r.code, 1);
      assertMatch(r.stderr, /in use \(mounted/);
      // A mounted tracked device cannot be detached either.
      await sh("mkfs.ext4", "-q", "-F", tracked);
      await Deno.mkdir("/mnt/tracked", { recursive: true });
      await sh("mount", tracked, "/mnt/tracked");
      try {
        const d = await cli.run("detach", "--device", loop.path);
        assertEquals(d.code, 1);
        assertMatch(d.stderr, /in use/);
      } finally {
        await sh("umount", "/mnt/tracked");
      }
    } finally {
      await sh("umount", "/mnt/other");
    }
    assertEquals(ublkNodes(), before);

    // Garbage straight to the socket: error replies, connection and daemon survive.
    const conn = await Deno.connect({ transport: "unix", path: cli.socket });
    const enc = new TextEncoder();
    const replies: string[] = [];
    const buf = new Uint8Array(65536);
    let pending = "";
    const garbage = [
      "this is not json",
      "[1,2,3]",
      '{"v":99,"id":1,"op":"status"}',
      '{"v":1,"id":-4,"op":"status"}',
      '{"v":1,"id":2,"op":"launch_missiles"}',
      '{"v":1,"id":3,"op":"attach","args":{"device":42}}',
      '{"v":1,"id":4,"op":"attach","args":{"device":"/dev/null","evil":true}}',
      '{"v":1,"id":5,"op":"detach","args":null}',
      '{"v":1,"id":6,"op":"ping"}',
    ];
    for (const g of garbage) {
      await conn.write(enc.encode(g + "\n"));
      while (!pending.includes("\n")) {
        const n = await conn.read(buf);
        if (n === null) throw new Error("daemon closed the connection");
        pending += new TextDecoder().decode(buf.subarray(0, n));
      }
      const i = pending.indexOf("\n");
      replies.push(pending.slice(0, i));
      pending = pending.slice(i + 1);
    }
    conn.close();
    const parsed = replies.map((r) => JSON.parse(r));
    for (const p of parsed.slice(0, -1)) {
      assertEquals(p.ok, false, JSON.stringify(p));
      assert(typeof p.error.message === "string" && p.error.message.length > 0);
    }
    assertEquals(parsed.at(-1).ok, true);
    // Binary noise and an over-long line.
    const raw = await Deno.connect({ transport: "unix", path: cli.socket });
    await raw.write(crypto.getRandomValues(new Uint8Array(4096)));
    await raw.write(enc.encode("x".repeat(70 * 1024)));
    raw.close();

    const st = await cli.json<{ devices: unknown[] }>("status");
    assertEquals(st.devices.length, 1);
    assertEquals(ublkNodes(), before);
    await cli.ok("detach", "--device", loop.path);
  } finally {
    await cli.stopDaemon();
    await loop.destroy();
    await other.destroy();
  }
  assertNoUblkDevices();
});
