import { deepStrictEqual as assertEquals, ok as assert } from "node:assert/strict";
import { ControlServer, type DaemonApi } from "./server.ts";
import { BlksnapError } from "../../ffi/errno.ts";
import { Client, DaemonError, DaemonUnavailableError, requestTimeoutMs } from "./client.ts";

/** A daemon stand-in: records calls; attach of "/busy" fails like the real one. */
function fakeDaemon(calls: string[]): DaemonApi {
  let created = 0;
  const snaps = new Set<string>();
  return {
    version: () => ({ version: "t", protocol: 1, pid: 1, ublkFeatures: [], ioctlEncoding: true }),
    status: () => ({} as ReturnType<DaemonApi["status"]>),
    attach: (device: string) => {
      calls.push(`attach ${device}`);
      if (device === "/busy") return Promise.reject(new BlksnapError("EBUSY", "in use"));
      if (device === "/bug") return Promise.reject(new TypeError("a bug"));
      return Promise.resolve(
        { tracked: "/dev/ublkb0" } as Awaited<ReturnType<DaemonApi["attach"]>>,
      );
    },
    detach: () => Promise.reject(new BlksnapError("ENOENT", "not tracked")),
    recover: () => Promise.reject(new BlksnapError("ENOENT", "nothing to recover")),
    detachForce: () => Promise.reject(new BlksnapError("ENOENT", "not tracked")),
    cbtInfo: notTracked,
    readCbtMap: notTracked,
    markDirty: notTracked,
    snapshotInfo: notTracked,
    snapshotCreate: (args) => {
      if (args.storage !== "/ok") return Promise.reject(new BlksnapError("ENOENT", "no storage"));
      const id = `00000000-0000-4000-8000-${String(++created).padStart(12, "0")}`;
      snaps.add(id);
      calls.push(`create ${id.slice(-1)}`);
      return Promise.resolve({ id });
    },
    snapshotAdd: noSnapshot,
    snapshotTake: noSnapshot,
    snapshotDestroy: (id: string) => {
      if (!snaps.delete(id)) return noSnapshot();
      calls.push(`destroy ${id.slice(-1)}`);
      return Promise.resolve({ id });
    },
    snapshotCollect: () => ({ ids: [] }),
    snapshotWaitEvent: noSnapshot,
    prepareHandover: (force: boolean) => {
      calls.push(`handover ${force}`);
      return force
        ? Promise.resolve({ pid: 1, devices: 2, snapshotsLost: 1 })
        : Promise.reject(new BlksnapError("EBUSY", "1 snapshot(s) held"));
    },
  };
}

function notTracked(): never {
  throw new BlksnapError("ENOENT", "not tracked");
}

function noSnapshot(): Promise<never> {
  return Promise.reject(new BlksnapError("ESRCH", "no such snapshot"));
}

async function withServer(
  fn: (path: string, calls: string[], server: ControlServer) => Promise<void>,
): Promise<void> {
  const dir = Deno.makeTempDirSync();
  const path = `${dir}/control.sock`;
  const calls: string[] = [];
  const server = await ControlServer.listen(fakeDaemon(calls), path);
  const serving = server.serve();
  try {
    assertEquals(Deno.statSync(path).mode! & 0o777, 0o600);
    await fn(path, calls, server);
  } finally {
    server.close();
    await serving;
    Deno.removeSync(dir, { recursive: true });
  }
}

async function exchange(path: string, lines: string[]): Promise<Array<Record<string, unknown>>> {
  const conn = await Deno.connect({ transport: "unix", path });
  const replies: Array<Record<string, unknown>> = [];
  let pending = "";
  const buf = new Uint8Array(65536);
  for (const line of lines) {
    await conn.write(new TextEncoder().encode(line + "\n"));
    while (!pending.includes("\n")) {
      const n = await conn.read(buf);
      if (n === null) throw new Error("closed");
      pending += new TextDecoder().decode(buf.subarray(0, n));
    }
    const i = pending.indexOf("\n");
    replies.push(JSON.parse(pending.slice(0, i)));
    pending = pending.slice(i + 1);
  }
  conn.close();
  return replies;
}

Deno.test("a handover is refused while snapshots are held, and signalled only after its reply", async () => {
  await withServer(async (path, calls, server) => {
    let requested = false;
    server.handoverRequested.then(() => (requested = true));
    const [refused] = await exchange(path, [
      JSON.stringify({ v: 1, id: 1, op: "handover", args: { force: false } }),
    ]);
    assertEquals(refused!.ok, false);
    assertEquals((refused!.error as { code: string }).code, "EBUSY");
    await new Promise((r) => setTimeout(r, 10));
    assertEquals(requested, false, "a refused handover does not stop the daemon");
    const [bad] = await exchange(path, [
      JSON.stringify({ v: 1, id: 2, op: "handover", args: { force: "yes" } }),
    ]);
    assertEquals(bad!.ok, false, "force must be a boolean");
    const [accepted] = await exchange(path, [
      JSON.stringify({ v: 1, id: 3, op: "handover", args: { force: true } }),
    ]);
    assertEquals(accepted!.ok, true);
    assertEquals(accepted!.result, { pid: 1, devices: 2, snapshotsLost: 1 });
    await server.handoverRequested;
    assert(requested);
    assertEquals(calls, ["handover false", "handover true"]);
  });
});

/** Waits (up to 2 s) until `calls` has `n` entries. */
async function callsReach(calls: string[], n: number): Promise<void> {
  for (let i = 0; i < 200 && calls.length < n; i++) await new Promise((r) => setTimeout(r, 10));
}

Deno.test("a session snapshot is destroyed when its connection closes, other snapshots are not", async () => {
  await withServer(async (path, calls) => {
    const create = (id: number, session?: boolean) =>
      JSON.stringify({
        v: 1,
        id,
        op: "snapshot_create",
        args: {
          devices: [],
          storage: "/ok",
          limitBytes: 1,
          clientPid: 1,
          ...(session !== undefined ? { session } : {}),
        },
      });
    // One with session, one without, one with session false: only the first goes.
    const replies = await exchange(path, [create(1, true), create(2), create(3, false)]);
    assertEquals(replies.map((r) => r.ok), [true, true, true]);
    await callsReach(calls, 4);
    assertEquals(calls, ["create 1", "create 2", "create 3", "destroy 1"]);

    // Destroyed by its client before the close: not destroyed again (no ESRCH noise).
    calls.length = 0;
    const [made] = await exchange(path, [create(4, true)]);
    assertEquals(made!.ok, true);
    await callsReach(calls, 2);
    assertEquals(calls, ["create 4", "destroy 4"]);
    calls.length = 0;
    const id = (made!.result as { id: string }).id;
    assertEquals(id.slice(-1), "4");
    const c = await Client.connect(path);
    const r = await c.request("snapshot_create", {
      devices: [],
      storage: "/ok",
      limitBytes: 1,
      clientPid: 1,
      session: true,
    }) as { id: string };
    await c.request("snapshot_destroy", { id: r.id });
    c.close();
    await new Promise((r) => setTimeout(r, 50));
    assertEquals(calls, ["create 5", "destroy 5"]);

    // A client that dies waiting for the reply: the snapshot still goes.
    calls.length = 0;
    const conn = await Deno.connect({ transport: "unix", path });
    await conn.write(new TextEncoder().encode(create(6, true) + "\n"));
    conn.close();
    await callsReach(calls, 2);
    assertEquals(calls, ["create 6", "destroy 6"]);

    // A bad session value is refused, nothing made.
    calls.length = 0;
    const [bad] = await exchange(path, [
      JSON.stringify({
        v: 1,
        id: 7,
        op: "snapshot_create",
        args: { devices: [], storage: "/ok", limitBytes: 1, clientPid: 1, session: "yes" },
      }),
    ]);
    assertEquals((bad!.error as { code: string }).code, "EINVAL");
    assertEquals(calls, []);
  });
});

Deno.test("a session snapshot is left alone when the daemon itself stops", async () => {
  const dir = Deno.makeTempDirSync();
  const path = `${dir}/control.sock`;
  const calls: string[] = [];
  const server = await ControlServer.listen(fakeDaemon(calls), path);
  const serving = server.serve();
  const c = await Client.connect(path);
  try {
    await c.request("snapshot_create", {
      devices: [],
      storage: "/ok",
      limitBytes: 1,
      clientPid: 1,
      session: true,
    });
    server.close();
    await serving;
    await new Promise((r) => setTimeout(r, 50));
    assertEquals(calls, ["create 1"]);
  } finally {
    c.close();
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("ControlServer answers garbage with errors and keeps the connection", async () => {
  await withServer(async (path, calls) => {
    const replies = await exchange(path, [
      "not json",
      '{"v":7,"id":1,"op":"status"}',
      '{"v":1,"id":2,"op":"format_disk"}',
      '{"v":1,"id":3,"op":"attach","args":{"device":"/busy"}}',
      '{"v":1,"id":4,"op":"attach","args":{"device":"/bug"}}',
      '{"v":1,"id":5,"op":"ping"}',
    ]);
    assertEquals(replies.map((r) => r.ok), [false, false, false, false, false, true]);
    assertEquals(replies.map((r) => (r.error as { code?: string } | undefined)?.code), [
      "EPROTO",
      "EPROTO",
      "EINVAL",
      "EBUSY",
      "EIO",
      undefined,
    ]);
    assertEquals(replies.map((r) => r.id), [0, 1, 2, 3, 4, 5]);
    assertEquals(calls, ["attach /busy", "attach /bug"]);
  });
});

Deno.test("ControlServer survives an over-long line and binary noise", async () => {
  await withServer(async (path) => {
    const c = await Deno.connect({ transport: "unix", path });
    await c.write(crypto.getRandomValues(new Uint8Array(1000)));
    await c.write(new TextEncoder().encode("y".repeat(100_000)));
    c.close();
    const [r] = await exchange(path, ['{"v":1,"id":9,"op":"ping"}']);
    assertEquals(r!.ok, true);
  });
});

Deno.test("Client numbers requests and turns error replies into DaemonError", async () => {
  await withServer(async (path) => {
    const client = await Client.connect(path);
    try {
      assertEquals(await client.request("attach", { device: "/dev/x" }), {
        tracked: "/dev/ublkb0",
      });
      let err: unknown;
      try {
        await client.request("detach", { device: "/dev/x" });
      } catch (e) {
        err = e;
      }
      assert(err instanceof DaemonError);
      assertEquals([err.code, err.errno, err.message], ["ENOENT", 2, "not tracked"]);
    } finally {
      client.close();
    }
  });
});

Deno.test("ControlServer.listen() refuses a socket another daemon answers on", async () => {
  await withServer(async (path) => {
    let err: unknown;
    try {
      await ControlServer.listen(fakeDaemon([]), path);
    } catch (e) {
      err = e;
    }
    assert(err instanceof Error && /another blksnap daemon is running/.test(err.message));
  });
});

Deno.test("Client gives up on a daemon that never answers, with a message saying so", async () => {
  const dir = Deno.makeTempDirSync();
  const path = `${dir}/mute.sock`;
  const listener = Deno.listen({ transport: "unix", path });
  const accepted: Deno.Conn[] = [];
  const accepting = (async () => {
    for await (const c of listener) accepted.push(c); // reads nothing, answers nothing
  })();
  try {
    const client = await Client.connect(path);
    const started = performance.now();
    let error: unknown;
    try {
      await client.request("ping", {}, 200);
    } catch (err) {
      error = err;
    }
    assert(error instanceof DaemonUnavailableError, String(error));
    assert(/did not answer ping in 0 s/.test((error as Error).message), (error as Error).message);
    assert(performance.now() - started < 5000, "it gave up at the timeout");
    client.close();
    assertEquals(
      requestTimeoutMs("snapshot_waitevent", { timeoutMs: 5000 }) - requestTimeoutMs("ping", {}),
      5000,
    );
  } finally {
    listener.close();
    for (const c of accepted) c.close();
    await accepting.catch(() => {});
    Deno.removeSync(dir, { recursive: true });
  }
});
