import { deepStrictEqual as assertEquals, ok as assert, throws } from "node:assert/strict";
import {
  besideSocket,
  type DaemonState,
  emptyState,
  moveAside,
  parseState,
  readStateFile,
  writeStateFile,
} from "./state_file.ts";
import { BlksnapError } from "../engine/errors.ts";

function sample(): DaemonState {
  const s = emptyState();
  s.devices = [
    {
      role: "tracked",
      ublkId: 0,
      original: "/dev/loop0",
      originalDevice: "7:0",
      tracked: "/dev/ublkb0",
      trackedDevice: "259:1",
      sizeBytes: 1 << 28,
      logicalBlockSize: 512,
      physicalBlockSize: 4096,
      queues: 2,
      queueDepth: 128,
      maxIoBufBytes: 524288,
      phase: "live",
      cbtGenerationId: "0f0e0d0c-0b0a-4908-8706-050403020100",
      attachedAt: "2026-01-01T00:00:00.000Z",
    },
    { role: "image", ublkId: 1, originalDevice: "7:0", snapshotId: "s1" },
  ];
  s.snapshots = [{ id: "s1", devices: ["/dev/loop0"], storage: "/tmp", taken: true }];
  return s;
}

Deno.test("besideSocket() names the state and lock files after the socket", () => {
  assertEquals(besideSocket("/run/blksnap/control.sock", "state"), "/run/blksnap/control.state");
  assertEquals(besideSocket("/run/blksnap/control.sock", "lock"), "/run/blksnap/control.lock");
  assertEquals(besideSocket("/tmp/x", "state"), "/tmp/x.state");
});

Deno.test("writeStateFile() replaces the file atomically and readStateFile() reads it back", () => {
  const dir = Deno.makeTempDirSync();
  try {
    const path = `${dir}/control.state`;
    assertEquals(readStateFile(path), null);
    writeStateFile(path, emptyState());
    const s = sample();
    writeStateFile(path, s);
    assertEquals(readStateFile(path), s);
    // No temporary file is left, and the mode keeps it to root.
    assertEquals([...Deno.readDirSync(dir)].map((e) => e.name), ["control.state"]);
    assertEquals(Deno.statSync(path).mode! & 0o777, 0o600);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("writeStateFile() that cannot write fails with EIO and leaves the old file as it was", () => {
  const dir = Deno.makeTempDirSync();
  try {
    const path = `${dir}/control.state`;
    const old = sample();
    writeStateFile(path, old);
    // A directory where the temporary file would go makes the write fail.
    Deno.mkdirSync(`${path}.tmp-${Deno.pid}`);
    Deno.writeTextFileSync(`${path}.tmp-${Deno.pid}/x`, "");
    throws(() => writeStateFile(path, emptyState()), (e: unknown) => {
      assert(e instanceof BlksnapError && e.code === "EIO");
      assert(e.message.includes(path), e.message);
      return true;
    });
    assertEquals(readStateFile(path), old);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("parseState() rejects a bad file with a message that names the file and the fault", () => {
  const cases: Array<[string, RegExp]> = [
    ["", /not JSON/],
    ['{"format":"blksnap-st', /not JSON/],
    ["[]", /not a JSON object/],
    [JSON.stringify({ ...sample(), format: "x" }), /"format"/],
    [JSON.stringify({ ...sample(), version: 9 }), /version 9/],
    [JSON.stringify({ ...sample(), devices: {} }), /"devices" is not a list/],
    [
      JSON.stringify({ ...sample(), devices: [{ ...sample().devices[0], role: "disk" }] }),
      /device 0: "role"/,
    ],
    [
      JSON.stringify({ ...sample(), devices: [{ ...sample().devices[0], originalDevice: "7" }] }),
      /device 0: "originalDevice"/,
    ],
    [
      JSON.stringify({ ...sample(), devices: [{ ...sample().devices[0], sizeBytes: -1 }] }),
      /device 0: "sizeBytes"/,
    ],
    [
      JSON.stringify({ ...sample(), devices: [sample().devices[0], sample().devices[0]] }),
      /device 1: ublk id 0 is listed twice/,
    ],
    [JSON.stringify({ ...sample(), snapshots: [{ id: 1 }] }), /snapshot 0: "id"/],
  ];
  for (const [text, why] of cases) {
    throws(() => parseState(text, "/run/blksnap/control.state"), (e: unknown) => {
      assert(e instanceof BlksnapError && e.code === "EINVAL", String(e));
      assert(e.message.startsWith(`The state file "/run/blksnap/control.state" is not valid:`));
      assert(why.test(e.message), `${e.message} does not match ${why}`);
      return true;
    });
  }
});

Deno.test("a torn (truncated) state file is reported, and moveAside() keeps it for a look", () => {
  const dir = Deno.makeTempDirSync();
  try {
    const path = `${dir}/control.state`;
    writeStateFile(path, sample());
    const text = Deno.readTextFileSync(path);
    Deno.writeTextFileSync(path, text.slice(0, text.length / 2));
    throws(() => readStateFile(path), /is not valid: not JSON/);
    const aside = moveAside(path);
    assert(aside !== null && aside.startsWith(`${path}.bad-`));
    assertEquals(readStateFile(path), null);
    assertEquals(Deno.readTextFileSync(aside), text.slice(0, text.length / 2));
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});
