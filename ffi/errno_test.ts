import { strictEqual as assertEquals } from "node:assert/strict";
import { BlksnapError, ErrnoError, errnoName } from "./errno.ts";

Deno.test("ErrnoError names the call, the errno and its meaning", () => {
  const e = new ErrnoError('open("/dev/sdb")', -16);
  assertEquals(e.errno, 16);
  assertEquals(e.code, "EBUSY");
  assertEquals(e.message, 'open("/dev/sdb"): EBUSY (Device or resource busy)');
  assertEquals(new ErrnoError("x", 2, "why").message, "x: ENOENT (No such file or directory): why");
  assertEquals(errnoName(9999), undefined);
  assertEquals(new ErrnoError("y", 9999).code, "E9999");
});

Deno.test("BlksnapError.fromErrno() keeps a named errno, else EIO, with the call as cause", () => {
  const busy = new ErrnoError('open("/dev/sdb")', 16);
  const e = BlksnapError.fromErrno(busy, "Cannot attach");
  assertEquals(e.code, "EBUSY");
  assertEquals(e.errno, 16);
  assertEquals(e.message, "Cannot attach");
  assertEquals(e.cause, busy);
  assertEquals(BlksnapError.fromErrno(new ErrnoError("x", 9999), "m").code, "EIO");
});
