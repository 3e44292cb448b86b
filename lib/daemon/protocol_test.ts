import { deepStrictEqual as assertEquals, throws as assertThrows } from "node:assert/strict";
import { errorBody, parseRequest, PROTOCOL_VERSION, salvageId } from "./protocol.ts";
import { BlksnapError } from "../engine/errors.ts";

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
