import { deepStrictEqual as assertEquals, ok as assert, throws } from "node:assert/strict";
import { DaemonLock } from "./daemon_lock.ts";
import { BlksnapError } from "../engine/errors.ts";

Deno.test("DaemonLock: one holder at a time; released, it can be taken again", () => {
  const dir = Deno.makeTempDirSync();
  try {
    const path = `${dir}/control.lock`;
    assertEquals(DaemonLock.isHeld(path), false);
    const a = DaemonLock.acquire(path);
    assertEquals(Deno.readTextFileSync(path), `${Deno.pid}\n`);
    assertEquals(DaemonLock.isHeld(path), true);
    throws(() => DaemonLock.acquire(path), (e: unknown) => {
      assert(e instanceof BlksnapError && e.code === "EBUSY");
      assert(e.message.includes(`pid ${Deno.pid}`) && e.message.includes(path), e.message);
      return true;
    });
    a.release();
    a.release(); // idempotent
    assertEquals(DaemonLock.isHeld(path), false);
    DaemonLock.acquire(path).release();
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("DaemonLock: of several threads racing for it, exactly one wins", async () => {
  // flock(2) belongs to the open file, so two opens contend even in one process.
  const dir = Deno.makeTempDirSync();
  try {
    const path = `${dir}/control.lock`;
    const mod = new URL("./daemon_lock.ts", import.meta.url).href;
    const script = `${dir}/racer.js`;
    Deno.writeTextFileSync(
      script,
      `import { DaemonLock } from ${JSON.stringify(mod)};
      let held = null;
      self.onmessage = (ev) => {
        if (ev.data === "release") {
          held?.release();
          return;
        }
        try {
          held = DaemonLock.acquire(${JSON.stringify(path)});
          self.postMessage("won");
        } catch (e) { self.postMessage(e.code); }
      };`,
    );
    const workers = Array.from(
      { length: 4 },
      () => new Worker(new URL(`file://${script}`).href, { type: "module" }),
    );
    const outs = await Promise.all(workers.map((w) =>
      new Promise<string>((resolve) => {
        w.onmessage = (ev) => resolve(ev.data);
        w.postMessage("go");
      })
    ));
    // The winner holds the lock until every racer has tried (however late it started).
    for (const w of workers) w.postMessage("release");
    await new Promise((r) => setTimeout(r, 50));
    for (const w of workers) w.terminate();
    assertEquals(outs.filter((o) => o === "won").length, 1, outs.join(","));
    assertEquals(outs.filter((o) => o === "EBUSY").length, 3, outs.join(","));
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});
