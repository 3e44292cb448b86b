import { deepStrictEqual as assertEquals, throws as assertThrows } from "node:assert/strict";
import { errorBody, parseRequest, PROTOCOL_VERSION, salvageId } from "./protocol.ts";
import { BlksnapError } from "../../ffi/errno.ts";

function code(line: string): string {
  try {
    parseRequest(line);
  } catch (err) {
    if (err instanceof BlksnapError) return err.code;
    throw err;
  }
  return "ok";
}

Deno.test("parseRequest() accepts a well-formed attach", () => {
  const r = parseRequest(
    `{"v":${PROTOCOL_VERSION},"id":3,"op":"attach","args":{"device":"/dev/sdb"}}`,
  );
  assertEquals(r, { v: 1, id: 3, op: "attach", args: { device: "/dev/sdb" } });
});

Deno.test("parseRequest() defaults missing args to an empty object", () => {
  assertEquals(parseRequest('{"v":1,"id":0,"op":"status"}').args, {});
});

Deno.test("parseRequest() rejects garbage with EPROTO, never a crash", () => {
  for (const line of ["", "nope", "[]", "null", "42", '"s"', "{", "\u0000\u0001"]) {
    assertEquals(code(line), "EPROTO", JSON.stringify(line));
  }
});

Deno.test("parseRequest() rejects another protocol version", () => {
  assertEquals(code('{"v":2,"id":1,"op":"status"}'), "EPROTO");
  assertEquals(code('{"id":1,"op":"status"}'), "EPROTO");
});

Deno.test("parseRequest() rejects bad ids, ops and arguments", () => {
  assertEquals(code('{"v":1,"id":-1,"op":"status"}'), "EPROTO");
  assertEquals(code('{"v":1,"id":1.5,"op":"status"}'), "EPROTO");
  assertEquals(code('{"v":1,"id":"1","op":"status"}'), "EPROTO");
  assertEquals(code('{"v":1,"id":1,"op":"rm -rf"}'), "EINVAL");
  assertEquals(code('{"v":1,"id":1,"op":"__proto__"}'), "EINVAL");
  assertEquals(code('{"v":1,"id":1,"op":"attach"}'), "EINVAL");
  assertEquals(code('{"v":1,"id":1,"op":"attach","args":{"device":""}}'), "EINVAL");
  assertEquals(code('{"v":1,"id":1,"op":"attach","args":{"device":7}}'), "EINVAL");
  assertEquals(code('{"v":1,"id":1,"op":"attach","args":[]}'), "EINVAL");
  assertEquals(code('{"v":1,"id":1,"op":"attach","args":{"device":"/d","x":1}}'), "EINVAL");
  assertEquals(code('{"v":1,"id":1,"op":"attach","args":{"device":"sdb1"}}'), "EINVAL");
});

Deno.test("BlksnapError.toBody() carries the errno number", () => {
  assertEquals(errorBody(new BlksnapError("EBUSY", "busy")), {
    code: "EBUSY",
    errno: 16,
    message: "busy",
  });
  assertThrows(() => {
    throw new BlksnapError("ENOENT", "x");
  }, BlksnapError);
});

Deno.test("salvageId() finds the id of a rejected request when it can", () => {
  assertEquals(salvageId('{"v":9,"id":12}'), 12);
  assertEquals(salvageId("garbage"), 0);
});

/** The request line of `op` with `args`. */
function req(op: string, args: unknown): string {
  return JSON.stringify({ v: 1, id: 1, op, args });
}

const ID = "0123abcd-4567-89ef-0123-456789abcdef";

Deno.test("parseRequest() accepts every snapshot and CBT op with good args", () => {
  const good: Array<[string, Record<string, unknown>]> = [
    ["cbtinfo", { device: "/dev/sdb" }],
    ["readcbtmap", { device: "/dev/block/8:16" }],
    ["markdirtyblock", { device: "/dev/sdb", ranges: [{ sector: 0, count: 1 }] }],
    ["markdirtyblock", {
      device: "/dev/sdb",
      ranges: [{ sector: 2 ** 40, count: 8 }, { count: 2, sector: 5 }],
    }],
    ["snapshot_create", { devices: [], storage: "/var/tmp", limitBytes: 0, clientPid: 1 }],
    ["snapshot_create", {
      devices: ["/dev/sdb", "/dev/sdc"],
      storage: "/dev/sdd",
      limitBytes: 2 ** 40,
      clientPid: 4242,
    }],
    ["snapshot_create", {
      devices: [],
      storage: "/var/tmp",
      limitBytes: 1,
      clientPid: 1,
      session: true,
    }],
    ["snapshot_create", {
      devices: [],
      storage: "/var/tmp",
      limitBytes: 1,
      clientPid: 1,
      session: false,
    }],
    ["snapshot_add", { id: ID, device: "/dev/sdb" }],
    ["snapshot_take", { id: ID }],
    ["snapshot_destroy", { id: ID }],
    ["snapshot_collect", {}],
    ["snapshot_info", { device: "/dev/sdb" }],
    ["snapshot_waitevent", { id: ID, timeoutMs: 0 }],
    ["snapshot_waitevent", { id: ID, timeoutMs: 2 ** 31 - 1 }],
  ];
  for (const [op, args] of good) {
    const r = parseRequest(req(op, args));
    assertEquals([r.op, r.args], [op, args], op);
  }
  assertEquals(parseRequest('{"v":1,"id":1,"op":"snapshot_collect"}').args, {});
});

Deno.test("parseRequest() canonicalises snapshot ids to lower case", () => {
  const r = parseRequest(req("snapshot_take", { id: ID.toUpperCase() }));
  assertEquals(r.args, { id: ID });
});

Deno.test("parseRequest() rejects bad args of every snapshot and CBT op with EINVAL", () => {
  const dev = "/dev/sdb";
  const create = { devices: [dev], storage: "/var/tmp", limitBytes: 1, clientPid: 1 };
  const bad: Array<[string, unknown]> = [
    // device paths
    ["cbtinfo", {}],
    ["cbtinfo", { device: "" }],
    ["cbtinfo", { device: "sdb" }],
    ["cbtinfo", { device: ["/dev/sdb"] }],
    ["cbtinfo", { device: dev, extra: 1 }],
    ["readcbtmap", { device: 8 }],
    ["readcbtmap", { device: "/dev/a\u0000b" }],
    ["snapshot_info", { device: null }],
    ["snapshot_info", { device: dev, id: ID }],
    // ranges
    ["markdirtyblock", { device: dev }],
    ["markdirtyblock", { device: dev, ranges: [] }],
    ["markdirtyblock", { device: dev, ranges: "0:8" }],
    ["markdirtyblock", { device: dev, ranges: [[0, 8]] }],
    ["markdirtyblock", { device: dev, ranges: [null] }],
    ["markdirtyblock", { device: dev, ranges: [{ sector: 0 }] }],
    ["markdirtyblock", { device: dev, ranges: [{ sector: 0, count: 0 }] }],
    ["markdirtyblock", { device: dev, ranges: [{ sector: -1, count: 1 }] }],
    ["markdirtyblock", { device: dev, ranges: [{ sector: 0.5, count: 1 }] }],
    ["markdirtyblock", { device: dev, ranges: [{ sector: "0", count: 1 }] }],
    ["markdirtyblock", { device: dev, ranges: [{ sector: 2 ** 53, count: 1 }] }],
    ["markdirtyblock", { device: dev, ranges: [{ sector: 0, count: 1, x: 1 }] }],
    ["markdirtyblock", {
      device: dev,
      ranges: Array.from({ length: 65537 }, () => ({ sector: 0, count: 1 })),
    }],
    // snapshot_create
    ["snapshot_create", { ...create, devices: undefined }],
    ["snapshot_create", { ...create, devices: "/dev/sdb" }],
    ["snapshot_create", { ...create, devices: ["sdb"] }],
    ["snapshot_create", { ...create, devices: [""] }],
    ["snapshot_create", { ...create, devices: Array.from({ length: 65 }, () => dev) }],
    ["snapshot_create", { ...create, storage: "" }],
    ["snapshot_create", { ...create, storage: "tmp" }],
    ["snapshot_create", { ...create, limitBytes: -1 }],
    ["snapshot_create", { ...create, limitBytes: 1.5 }],
    ["snapshot_create", { ...create, limitBytes: "1G" }],
    ["snapshot_create", { ...create, limitBytes: 2 ** 53 }],
    ["snapshot_create", { ...create, clientPid: 0 }],
    ["snapshot_create", { ...create, clientPid: undefined }],
    ["snapshot_create", { ...create, file: "/var/tmp" }],
    ["snapshot_create", { ...create, session: "yes" }],
    ["snapshot_create", { ...create, session: null }],
    ["snapshot_create", { ...create, session: 1 }],
    // ids
    ["snapshot_add", { id: ID }],
    ["snapshot_add", { device: dev }],
    ["snapshot_add", { id: "nope", device: dev }],
    ["snapshot_take", {}],
    ["snapshot_take", { id: ID.replaceAll("-", "") }],
    ["snapshot_take", { id: `{${ID}}` }],
    ["snapshot_take", { id: ID + "0" }],
    ["snapshot_take", { id: ID.replace("0", "g") }],
    ["snapshot_destroy", { id: 7 }],
    ["snapshot_destroy", { id: ID, force: true }],
    ["snapshot_collect", { all: true }],
    // timeouts
    ["snapshot_waitevent", { id: ID }],
    ["snapshot_waitevent", { id: ID, timeoutMs: -1 }],
    ["snapshot_waitevent", { id: ID, timeoutMs: 2 ** 31 }],
    ["snapshot_waitevent", { id: ID, timeoutMs: 10.5 }],
    ["snapshot_waitevent", { id: ID, timeoutMs: "1000" }],
    ["snapshot_waitevent", { timeoutMs: 1000 }],
  ];
  for (const [op, args] of bad) {
    assertEquals(code(req(op, args)), "EINVAL", `${op} ${JSON.stringify(args)?.slice(0, 80)}`);
  }
});

Deno.test("parseRequest() errors name the op, the argument and the bad value", () => {
  const message = (line: string) => {
    try {
      parseRequest(line);
    } catch (err) {
      return (err as Error).message;
    }
    return "";
  };
  assertEquals(
    message(req("snapshot_waitevent", { id: ID, timeoutMs: -1 })),
    'Operation "snapshot_waitevent": argument "timeoutMs" must be an integer from 0 to ' +
      "2147483647, not -1",
  );
  assertEquals(
    message(req("snapshot_take", {})),
    'Operation "snapshot_take": argument "id" must be a UUID (8-4-4-4-12 hex digits), not missing',
  );
  assertEquals(
    message(req("attach", { device: "sdb1" })),
    'Operation "attach": argument "device" must be an absolute path, not "sdb1"',
  );
});
