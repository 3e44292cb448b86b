/**
 * The snapshot and CBT commands against a fake daemon: what they send (checked
 * by the real parseRequest()), what they print in text and with --json, and
 * their exit statuses.
 */
import { deepStrictEqual as assertEquals, match as assertMatch } from "node:assert/strict";
import { cli, type FakeDaemon, type Handler, HANG_UP, withFakeDaemon } from "./_test_util.ts";
import type {
  CbtInfoResult,
  Envelope,
  SnapshotInfoResult,
  StatusResult,
  WaitEventResult,
} from "../daemon/protocol.ts";
import { BlksnapError } from "../../ffi/errno.ts";
import { resolve } from "node:path";

const ID = "0b5a3c1e-9f7d-4c2b-8a61-3e5d7f9b1c2a";
const GEN = "d4c3b2a1-0000-4000-8000-123456789abc";

const CBT: CbtInfoResult = {
  device: "/dev/loop0",
  tracked: "/dev/ublkb0",
  blockSize: 65536,
  deviceCapacity: 262144,
  blockCount: 4,
  generationId: GEN,
  changesNumber: 3,
};

const INFO: SnapshotInfoResult = {
  device: "/dev/loop0",
  id: ID,
  errorCode: 0,
  image: "/dev/ublkb7",
};

/** The canned answers of the spec, by op. */
const canned: Handler = (req) => {
  const a = req.args as Record<string, unknown>;
  switch (req.op) {
    case "cbtinfo":
      return CBT;
    case "readcbtmap":
      return { ...CBT, map: btoa(String.fromCharCode(0, 1, 3, 255)) };
    case "markdirtyblock":
      return { device: a.device, tracked: "/dev/ublkb0", ranges: a.ranges };
    case "snapshot_create":
      if (a.limitBytes === 0) throw new BlksnapError("EINVAL", "The limit must not be 0");
      return { id: ID };
    case "snapshot_add":
      return { id: a.id, device: a.device, tracked: "/dev/ublkb1", attached: true };
    case "snapshot_take":
      return {
        id: a.id,
        images: [{ original: "/dev/loop0", tracked: "/dev/ublkb0", image: "/dev/ublkb7" }],
        frozen: ["/dev/ublkb0"],
      };
    case "snapshot_destroy":
      return { id: a.id };
    case "snapshot_collect":
      return { ids: [ID, GEN] };
    case "snapshot_info":
      return INFO;
    case "snapshot_waitevent":
      return { result: "timeout" };
    default:
      throw new BlksnapError("EINVAL", `unexpected ${req.op}`);
  }
};

/** Runs the CLI against the canned fake daemon; returns the output and the requests. */
async function run(
  argv: string[],
  handler: Handler = canned,
): Promise<{ code: number; out: string; err: string; requests: Envelope[] }> {
  let result!: { code: number; out: string; err: string; requests: Envelope[] };
  await withFakeDaemon(handler, async (d: FakeDaemon) => {
    const r = await cli(d.socket, ...argv);
    assertEquals(d.rejected, [], "every request the CLI sends passes parseRequest()");
    result = { ...r, requests: d.requests };
  });
  return result;
}

const sent = (r: { requests: Envelope[] }) => r.requests.map((q) => [q.op, q.args]);

Deno.test("cbtinfo prints the tool's five lines; --json the result", async () => {
  const r = await run(["cbtinfo", "-d", "/dev/loop0"]);
  assertEquals([r.code, r.err], [0, ""]);
  assertEquals(
    r.out,
    "block_size=65536\ndevice_capacity=262144\nblock_count=4\n" +
      `generation_id=${GEN}\nchanges_number=3`,
  );
  assertEquals(sent(r), [["cbtinfo", { device: "/dev/loop0" }]]);
  const j = await run(["cbtinfo", "--device=/dev/loop0", "--json"]);
  assertEquals(JSON.parse(j.out), CBT);
});

Deno.test("cbtinfo resolves a relative device path; a daemon error exits 1", async () => {
  const r = await run(["cbtinfo", "-d", "dev/x"]);
  assertEquals(sent(r), [["cbtinfo", { device: resolve("dev/x") }]]);
  const e = await run(
    ["cbtinfo", "-d", "/dev/sdz"],
    () => {
      throw new BlksnapError("ENOENT", '"/dev/sdz" is not tracked');
    },
  );
  assertEquals([e.code, e.out, e.err], [1, "", 'blksnap: "/dev/sdz" is not tracked']);
  const j = await run(["cbtinfo", "-d", "/dev/sdz", "--json"], () => {
    throw new BlksnapError("ENOENT", "not tracked");
  });
  assertEquals(JSON.parse(j.out), { error: { code: "ENOENT", message: "not tracked" } });
});

Deno.test("readcbtmap writes blockCount raw bytes to the file and prints nothing", async () => {
  const dir = Deno.makeTempDirSync();
  try {
    const file = `${dir}/map`;
    Deno.writeFileSync(file, new Uint8Array(100).fill(9)); // truncated, not merged
    const r = await run(["readcbtmap", "-d", "/dev/loop0", "-f", file]);
    assertEquals([r.code, r.out, r.err], [0, "", ""]);
    assertEquals(Deno.readFileSync(file), new Uint8Array([0, 1, 3, 255]));
    assertEquals(sent(r), [["readcbtmap", { device: "/dev/loop0" }]]);
    const j = await run(["readcbtmap", "--device", "/dev/loop0", "--file", file, "--json"]);
    assertEquals(JSON.parse(j.out), { ...CBT, file, bytes: 4 });
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("readcbtmap refuses a map of the wrong size, and a file it cannot write", async () => {
  const dir = Deno.makeTempDirSync();
  try {
    const short = await run(
      ["readcbtmap", "-d", "/dev/loop0", "-f", `${dir}/m`],
      () => ({ ...CBT, map: btoa("\u0001") }),
    );
    assertEquals(short.code, 1);
    assertMatch(short.err, /change map of 1 bytes for 4 blocks/);
    const nodir = await run(["readcbtmap", "-d", "/dev/loop0", "-f", `${dir}/no/such/m`]);
    assertEquals(nodir.code, 1);
    assertMatch(nodir.err, /Cannot write ".*\/no\/such\/m"/);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("markdirtyblock -d -r: every range syntax, nothing printed, --json the result", async () => {
  const r = await run([
    "markdirtyblock",
    "-d",
    "/dev/loop0",
    "-r",
    "0:8,16:1",
    "--range",
    "100:2 200:3",
    "--ranges=5:5",
    "-r",
    "7:1",
    "9:2",
  ]);
  assertEquals([r.code, r.out, r.err], [0, "", ""]);
  // all --range values first, then --ranges (the order does not matter)
  const ranges = [[0, 8], [16, 1], [100, 2], [200, 3], [7, 1], [9, 2], [5, 5]].map((
    [sector, count],
  ) => ({ sector, count }));
  assertEquals(sent(r), [["markdirtyblock", { device: "/dev/loop0", ranges }]]);
  const j = await run(["markdirtyblock", "-d", "/dev/loop0", "-r", "1:1", "--json"]);
  assertEquals(JSON.parse(j.out), {
    device: "/dev/loop0",
    tracked: "/dev/ublkb0",
    ranges: [{ sector: 1, count: 1 }],
  });
});

Deno.test("markdirtyblock splits many ranges into requests that fit a line", async () => {
  const many = Array.from({ length: 6000 }, (_, i) => `${i * 1_000_000_000}:8`).join(",");
  const r = await run(["markdirtyblock", "-d", "/dev/loop0", "-r", many, "--json"]);
  assertEquals(r.code, 0);
  assertEquals(r.requests.length > 1, true);
  const all = r.requests.flatMap((q) => (q.args as { ranges: unknown[] }).ranges);
  assertEquals(all.length, 6000);
  assertEquals(JSON.parse(r.out).ranges.length, 6000);
});

Deno.test("markdirtyblock: bad command lines exit 2 and send nothing", async () => {
  const cases: Array<[string[], RegExp]> = [
    [["markdirtyblock", "-d", "/dev/loop0"], /--range is required/],
    [["markdirtyblock", "-r", "0:8"], /--device is required/],
    [["markdirtyblock", "-d", "/dev/loop0", "-r", "0:0"], /count >= 1.*"0:0"/],
    [["markdirtyblock", "-d", "/dev/loop0", "-r", "8"], /sector:count.*"8"/],
    [["markdirtyblock", "-d", "/dev/loop0", "-r", ","], /--range is required/],
    [["markdirtyblock", "-f", "/etc/hostname", "-d", "/dev/loop0"], /not both/],
  ];
  for (const [argv, re] of cases) {
    const r = await run(argv);
    assertEquals([r.code, r.requests.length], [2, 0], argv.join(" "));
    assertMatch(r.err, re);
  }
});

Deno.test("markdirtyblock -f: a missing or non-regular file exits 1 and sends nothing", async () => {
  const dir = Deno.makeTempDirSync();
  try {
    const missing = await run(["markdirtyblock", "-f", `${dir}/nope`]);
    assertEquals([missing.code, missing.requests.length], [1, 0]);
    assertMatch(missing.err, /"[^"]*\/nope" does not exist/);
    const isDir = await run(["markdirtyblock", "-f", dir]);
    assertEquals([isDir.code, isDir.requests.length], [1, 0]);
    assertMatch(isDir.err, /is not a regular file/);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

const ffi = Deno.permissions.querySync({ name: "ffi" }).state === "granted";

Deno.test({
  name: "markdirtyblock -f: FIEMAP ranges to /dev/block/MAJ:MIN of st_dev (needs --allow-ffi)",
  ignore: !ffi,
  async fn() {
    const dir = Deno.makeTempDirSync();
    try {
      const file = `${dir}/data`;
      Deno.writeFileSync(file, new Uint8Array(64 * 1024).fill(7));
      const r = await run(["markdirtyblock", "-f", file]);
      assertEquals([r.code, r.err], [0, ""]);
      const [op, args] = sent(r)[0]!;
      const a = args as { device: string; ranges: Array<{ sector: number; count: number }> };
      assertEquals(op, "markdirtyblock");
      assertMatch(a.device, /^\/dev\/block\/\d+:\d+$/);
      assertEquals(a.ranges.reduce((n, x) => n + x.count, 0), 128);
      assertEquals(
        r.out,
        [
          `device path: '${a.device}'`,
          ...a.ranges.map((x) => `allocate range: ofs=${x.sector} cnt=${x.count}`),
        ].join("\n"),
      );
      const j = await run(["markdirtyblock", "--file", file, "--json"]);
      assertEquals(JSON.parse(j.out).file, file);
      // an empty file: an error, nothing sent
      Deno.writeFileSync(`${dir}/empty`, new Uint8Array(0));
      const e = await run(["markdirtyblock", "-f", `${dir}/empty`]);
      assertEquals([e.code, e.requests.length, e.out], [1, 0, ""]);
      assertMatch(e.err, /has no blocks on the device/);
    } finally {
      Deno.removeSync(dir, { recursive: true });
    }
  },
});

Deno.test("snapshot_create sends absolute paths, the limit in bytes and its pid; prints the UUID", async () => {
  const dir = Deno.makeTempDirSync();
  try {
    const r = await run([
      "snapshot_create",
      "-d",
      "/dev/loop0",
      "/dev/loop1",
      "--device=dev/x",
      "-f",
      dir,
      "-l",
      "1G",
    ]);
    assertEquals([r.code, r.out, r.err], [0, ID, ""]);
    assertEquals(sent(r), [["snapshot_create", {
      devices: ["/dev/loop0", "/dev/loop1", resolve("dev/x")],
      storage: dir,
      limitBytes: 1024 ** 3,
      clientPid: Deno.pid,
    }]]);
    const none = await run(["snapshot_create", "--file", dir, "--limit", "512", "--json"]);
    assertEquals(JSON.parse(none.out), { id: ID });
    assertEquals((none.requests[0]!.args as { devices: string[] }).devices, []);
    // 0 reaches the daemon, which refuses it
    const zero = await run(["snapshot_create", "-f", dir, "-l", "0"]);
    assertEquals([zero.code, zero.out, zero.err], [1, "", "blksnap: The limit must not be 0"]);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("snapshot_create: bad limits exit 2, a missing storage exits 1, nothing sent", async () => {
  const dir = Deno.makeTempDirSync();
  try {
    for (const limit of ["-1", "1.5G", "ten", "1GB", ""]) {
      const r = await run(["snapshot_create", "-f", dir, `--limit=${limit}`]);
      assertEquals([r.code, r.requests.length], [2, 0], limit);
    }
    const noFile = await run(["snapshot_create", "-l", "1G"]);
    assertEquals(noFile.code, 2);
    assertMatch(noFile.err, /--file is required/);
    const noLimit = await run(["snapshot_create", "-f", dir]);
    assertMatch(noLimit.err, /--limit is required/);
    const missing = await run(["snapshot_create", "-f", `${dir}/nope`, "-l", "1G"]);
    assertEquals([missing.code, missing.requests.length], [1, 0]);
    assertMatch(missing.err, /The difference storage ".*\/nope" does not exist/);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("snapshot_add, _take, _destroy print nothing; --json the result; ids in lower case", async () => {
  const cases: Array<[string[], string, Record<string, unknown>]> = [
    [["snapshot_add", "-i", ID.toUpperCase(), "-d", "/dev/loop1"], "snapshot_add", {
      id: ID,
      device: "/dev/loop1",
    }],
    [["snapshot_take", "--id", ID], "snapshot_take", { id: ID }],
    [["snapshot_destroy", `--id=${ID}`], "snapshot_destroy", { id: ID }],
  ];
  for (const [argv, op, args] of cases) {
    const r = await run(argv);
    assertEquals([r.code, r.out, r.err], [0, "", ""], argv.join(" "));
    assertEquals(sent(r), [[op, args]]);
    const j = await run([...argv, "--json"]);
    assertEquals(JSON.parse(j.out), await canned({ v: 1, id: 1, op, args } as Envelope));
  }
});

Deno.test("snapshot commands refuse a malformed UUID with exit 2", async () => {
  for (const cmd of ["snapshot_take", "snapshot_destroy", "snapshot_watcher"]) {
    const r = await run([cmd, "-i", "1234"]);
    assertEquals([r.code, r.requests.length], [2, 0], cmd);
    assertMatch(r.err, /--id must be a snapshot UUID/);
  }
  const r = await run(["snapshot_waitevent", "-i", "x", "-t", "10"]);
  assertEquals(r.code, 2);
  const noId = await run(["snapshot_add", "-d", "/dev/loop0"]);
  assertMatch(noId.err, /snapshot_add: --id is required/);
});

Deno.test("snapshot_collect prints one UUID per line, nothing when there is none", async () => {
  const r = await run(["snapshot_collect"]);
  assertEquals([r.code, r.out], [0, `${ID}\n${GEN}`]);
  const none = await run(["snapshot_collect"], () => ({ ids: [] }));
  assertEquals([none.code, none.out], [0, ""]);
  assertEquals(JSON.parse((await run(["snapshot_collect", "--json"])).out), { ids: [ID, GEN] });
});

Deno.test("snapshot_info prints error_code= and image= lines, or one field's value", async () => {
  const r = await run(["snapshot_info", "-d", "/dev/loop0"]);
  assertEquals([r.code, r.out], [0, "error_code=0\nimage=/dev/ublkb7"]);
  assertEquals(
    (await run(["snapshot_info", "-d", "/dev/loop0", "-f", "image"])).out,
    "/dev/ublkb7",
  );
  const corrupted = () => ({ ...INFO, errorCode: -5 });
  const f = await run(["snapshot_info", "-d", "/dev/loop0", "--field", "error_code"], corrupted);
  assertEquals(f.out, "-5");
  assertEquals(JSON.parse((await run(["snapshot_info", "-d", "/dev/loop0", "--json"])).out), INFO);
  const bad = await run(["snapshot_info", "-d", "/dev/loop0", "-f", "uuid"]);
  assertEquals([bad.code, bad.requests.length], [2, 0]);
  assertMatch(bad.err, /--field must be image or error_code/);
});

Deno.test("snapshot_waitevent prints the tool's result=, time=, event= lines", async () => {
  const timeout = await run(["snapshot_waitevent", "-i", ID, "-t", "250"]);
  assertEquals([timeout.code, timeout.out], [0, "result=timeout"]);
  assertEquals(sent(timeout), [["snapshot_waitevent", { id: ID, timeoutMs: 250 }]]);
  const corrupted: WaitEventResult = {
    result: "ok",
    time: 1700000000123,
    event: "corrupted",
    code: 0,
    device: "7:0",
    errorCode: -28,
  };
  const c = await run(["snapshot_waitevent", "-i", ID, "-t", "0"], () => corrupted);
  assertEquals(
    c.out,
    "result=ok\ntime=1700000000123\nevent=corrupted\ndevice=7:0\nerror_code=-28",
  );
  const noSpace: WaitEventResult = {
    result: "ok",
    time: 5,
    event: "no_space",
    code: 1,
    requestedSectors: 4096,
  };
  const n = await run(["snapshot_waitevent", "-i", ID, "-t", "0"], () => noSpace);
  assertEquals(n.out, "result=ok\ntime=5\nevent=no_space\nrequested_nr_sect=4096");
  const j = await run(["snapshot_waitevent", "-i", ID, "-t", "0", "--json"], () => noSpace);
  assertEquals(JSON.parse(j.out), noSpace);
});

Deno.test("snapshot_waitevent: an unknown snapshot prints result=not found and exits 1", async () => {
  const gone = () => {
    throw new BlksnapError("ESRCH", `Snapshot ${ID} not found`);
  };
  const r = await run(["snapshot_waitevent", "-i", ID, "-t", "10"], gone);
  assertEquals([r.code, r.out, r.err], [
    1,
    "result=not found",
    `blksnap: Snapshot ${ID} not found`,
  ]);
  const j = await run(["snapshot_waitevent", "-i", ID, "-t", "10", "--json"], gone);
  assertEquals(JSON.parse(j.out).error.code, "ESRCH");
  for (const t of ["-1", "1.5", "2147483648", "soon"]) {
    const bad = await run(["snapshot_waitevent", "-i", ID, "-t", t]);
    assertEquals([bad.code, bad.requests.length], [2, 0], t);
  }
  assertMatch((await run(["snapshot_waitevent", "-i", ID])).err, /--timeout is required/);
});

/** A handler that answers snapshot_waitevent from a script, one step per request. */
function script(...steps: Array<WaitEventResult | "gone" | "hangup">): Handler {
  let i = 0;
  return (req) => {
    assertEquals(req.args, { id: ID, timeoutMs: 1000 });
    const step = steps[Math.min(i++, steps.length - 1)]!;
    if (step === "gone") throw new BlksnapError("ESRCH", "Snapshot not found");
    if (step === "hangup") return HANG_UP;
    return step;
  };
}

const NO_SPACE: WaitEventResult = {
  result: "ok",
  time: 10,
  event: "no_space",
  code: 1,
  requestedSectors: 2048 * 300,
};
const CORRUPTED: WaitEventResult = {
  result: "ok",
  time: 20,
  event: "corrupted",
  code: 0,
  device: "7:1",
  errorCode: -28,
};

Deno.test("snapshot_watcher prints events until corrupted (exit 1)", async () => {
  const timeout: WaitEventResult = { result: "timeout" };
  const r = await run(
    ["snapshot_watcher", "-i", ID],
    script(timeout, NO_SPACE, timeout, CORRUPTED, "gone"),
  );
  assertEquals(r.code, 1);
  assertEquals(r.out.split("\n"), [
    "Start snapshot watcher.",
    "10 - The difference storage already grew up to 300 MiB. Limit has been reached.",
    '20 - The snapshot was corrupted for device [7:1] with error "No space left on device".',
    "Snapshot watcher finished",
  ]);
  assertEquals(r.requests.length, 4);
});

Deno.test("snapshot_watcher exits 0 when the snapshot is gone; --json prints JSON lines", async () => {
  const r = await run(["snapshot_watcher", "-i", ID], script(NO_SPACE, "gone"));
  assertEquals(r.code, 0);
  assertEquals(r.out.split("\n"), [
    "Start snapshot watcher.",
    "10 - The difference storage already grew up to 300 MiB. Limit has been reached.",
    "Snapshot not found",
    "Snapshot watcher finished",
  ]);
  const j = await run(["snapshot_watcher", "-i", ID, "--json"], script(NO_SPACE, "gone"));
  assertEquals(j.out.split("\n").map((l) => JSON.parse(l)), [
    NO_SPACE,
    { result: "not found", id: ID },
  ]);
});

Deno.test("snapshot_watcher exits 3 when the daemon goes away", async () => {
  const r = await run(["snapshot_watcher", "-i", ID], script({ result: "timeout" }, "hangup"));
  assertEquals(r.code, 3);
  assertMatch(r.err, /The daemon closed the connection/);
});

Deno.test("without a daemon: exit 3 and a clear message; snapshot_collect prints nothing", async () => {
  const cases: string[][] = [
    ["cbtinfo", "-d", "/dev/loop0"],
    ["readcbtmap", "-d", "/dev/loop0", "-f", "/tmp/never-written"],
    ["markdirtyblock", "-d", "/dev/loop0", "-r", "0:8"],
    ["snapshot_add", "-i", ID, "-d", "/dev/loop0"],
    ["snapshot_take", "-i", ID],
    ["snapshot_destroy", "-i", ID],
    ["snapshot_info", "-d", "/dev/loop0"],
    ["snapshot_waitevent", "-i", ID, "-t", "10"],
    ["snapshot_watcher", "-i", ID],
  ];
  for (const argv of cases) {
    const r = await cli(undefined, ...argv);
    assertEquals([r.code, r.out], [3, ""], argv[0]);
    assertMatch(r.err, /No blksnap daemon answers on ".*": no (device is tracked|snapshot exists)/);
  }
  assertEquals(await cli(undefined, "snapshot_collect"), { code: 0, out: "", err: "" });
  assertEquals(JSON.parse((await cli(undefined, "snapshot_collect", "--json")).out), { ids: [] });
});

const STATUS: StatusResult = {
  version: "0.1.0.0",
  protocol: 1,
  pid: 42,
  ublkFeatures: ["ZERO_COPY"],
  ioctlEncoding: true,
  foreignDevices: [],
  startedAt: "2025-01-01T00:00:00.000Z",
  socket: "/run/blksnap/control.sock",
  devices: [{
    original: "/dev/loop0",
    originalDevice: "7:0",
    tracked: "/dev/ublkb0",
    trackedDevice: "259:0",
    ublkId: 0,
    sizeBytes: 1 << 30,
    logicalBlockSize: 512,
    physicalBlockSize: 4096,
    queues: 2,
    queueDepth: 128,
    userRecovery: false,
    readOnly: false,
    attachedAt: "2025-01-01T00:00:01.000Z",
    queueStats: [],
    cbt: { blockSize: 65536, blockCount: 16384, generationId: GEN, changesNumber: 3 },
  }],
  snapshots: [{
    id: ID,
    taken: true,
    takenAt: "2025-01-01T00:01:00.000Z",
    errorCode: 0,
    devices: [{ original: "/dev/loop0", tracked: "/dev/ublkb0", image: "/dev/ublkb7" }],
    storage: {
      path: "/var/tmp",
      kind: "tmpfile",
      io: "buffered",
      capacityBytes: 64 << 20,
      filledBytes: 3 << 20,
      limitBytes: 1 << 30,
    },
  }, {
    id: GEN,
    taken: false,
    takenAt: null,
    errorCode: -5,
    devices: [{ original: "/dev/loop0", tracked: "/dev/ublkb0", image: null }],
    storage: {
      path: "/dev/sdd",
      kind: "blockdev",
      io: "direct",
      capacityBytes: 1 << 30,
      filledBytes: 0,
      limitBytes: 1 << 30,
    },
  }],
};

Deno.test("status shows a CBT column and the snapshots", async () => {
  const r = await run(["status"], () => STATUS);
  assertEquals(r.code, 0);
  const lines = r.out.split("\n");
  assertMatch(lines[3]!, /ORIGINAL .* QUEUES {2}MODE {2}BLOCK .* ERRORS {2}CBT$/);
  assertMatch(lines[4]!, /^\/dev\/loop0 \(7:0\) .* 2x128 +rw +512\/4096 .* 0 +d4c3b2a1\/3$/);
  assertEquals(lines.slice(5), [
    `snapshot ${ID}: taken 2025-01-01T00:01:00.000Z, error_code=0`,
    "  storage: /var/tmp (tmpfile), used 3.00 MiB of 64.0 MiB, limit 1.00 GiB",
    "  /dev/loop0 (/dev/ublkb0) -> /dev/ublkb7",
    `snapshot ${GEN}: created, not taken, error_code=-5 (corrupted: Input/output error)`,
    "  storage: /dev/sdd (blockdev, direct I/O), used 0 B of 1.00 GiB, limit 1.00 GiB",
    "  /dev/loop0 (/dev/ublkb0) -> (no image until taken)",
  ]);
  assertEquals(JSON.parse((await run(["status", "--json"], () => STATUS)).out), {
    running: true,
    ...STATUS,
  });
});

Deno.test("status shows a read-only tracked device as ro", async () => {
  const device = { ...STATUS.devices[0]!, readOnly: true };
  const r = await run(["status"], () => ({ ...STATUS, devices: [device] }));
  assertEquals(r.code, 0);
  assertMatch(r.out.split("\n")[4]!, / 2x128 +ro +512\/4096 /);
});

Deno.test("status tolerates a daemon without snapshots or CBT", async () => {
  const { snapshots: _, ...old } = STATUS;
  const { cbt: __, ...device } = old.devices[0]!;
  const r = await run(["status"], () => ({ ...old, devices: [device] }));
  assertEquals(r.code, 0);
  const lines = r.out.split("\n");
  assertEquals(lines.length, 5);
  assertMatch(lines[4]!, / -$/);
  const none = await run(["status"], () => ({ ...STATUS, snapshots: [] }));
  assertEquals(none.out.split("\n").at(-1), "no snapshots");
});

Deno.test("status says what a daemon took over from one that died, and what it could not", async () => {
  const r = await run(["status"], () => ({
    ...STATUS,
    snapshots: [],
    recovery: {
      stateFile: "/run/blksnap/control.state",
      stateFileError: null,
      previousPid: 41,
      recovered: [{
        original: "/dev/loop0",
        tracked: "/dev/ublkb0",
        ublkId: 0,
        previousGenerationId: GEN,
        generationId: "0123abcd-0000-4000-8000-000000000000",
        cbtResetReason: "a switch or reset of it was cut short",
        recoveryMs: 120,
      }],
      unrecovered: [{
        original: "/dev/loop1",
        originalDevice: "7:1",
        tracked: "/dev/ublkb1",
        ublkId: 1,
        reason: "the original is gone",
        hint: "I/O to it waits",
      }],
      removed: [{ ublkId: 2, role: "image", original: "7:0", reason: "image of snapshot x" }],
      lostSnapshots: [{ id: ID, devices: ["/dev/loop0"], storage: "/var/tmp", reason: "lost" }],
    },
  }));
  assertEquals(r.code, 0);
  assertEquals(r.out.split("\n").slice(-5), [
    "no snapshots",
    "recovered /dev/ublkb0 over /dev/loop0 from the daemon that died (pid 41) in 120 ms; its CBT " +
    "map was reset, a switch or reset of it was cut short (generation d4c3b2a1 -> 0123abcd): " +
    "the next backup is a full one",
    "NOT recovered: /dev/ublkb1 over /dev/loop1: the original is gone; I/O to it waits",
    "removed /dev/ublkb2 (image): image of snapshot x",
    `snapshot ${ID} (/dev/loop0): corrupted: lost`,
  ]);
});
