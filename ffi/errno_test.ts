import { strictEqual as assertEquals } from "node:assert/strict";
import { ErrnoError, errnoName } from "./errno.ts";

Deno.test("ErrnoError names the call, the errno and its meaning", () => {
  const e = new ErrnoError('open("/dev/sdb")', -16);
  assertEquals(e.errno, 16);
  assertEquals(e.code, "EBUSY");
  assertEquals(e.message, 'open("/dev/sdb"): EBUSY (Device or resource busy)');
  assertEquals(new ErrnoError("x", 2, "why").message, "x: ENOENT (No such file or directory): why");
  assertEquals(errnoName(9999), undefined);
  assertEquals(new ErrnoError("y", 9999).code, "E9999");
});
