import { assertEquals, assertInstanceOf, assertStrictEquals, assertThrows } from "./_assert.ts";
import {
  assert,
  AssertionError,
  BlksnapError,
  ERRNO,
  errnoName,
  toBlksnapError,
} from "./errors.ts";

Deno.test("BlksnapError carries the errno name and number", () => {
  const error = new BlksnapError("ESRCH", "Snapshot 1234 not found");
  assertInstanceOf(error, Error);
  assertEquals(error.code, "ESRCH");
  assertEquals(error.errno, 3);
  assertEquals(error.name, "BlksnapError");
  assertEquals(error.message, "Snapshot 1234 not found");
});

Deno.test("errnoName() maps numbers back to names", () => {
  assertEquals(errnoName(ERRNO.ENOSPC), "ENOSPC");
  assertEquals(errnoName(9999), undefined);
});

Deno.test("assert() throws an AssertionError, never a BlksnapError", () => {
  assertThrows(() => assert(false, "broken"), AssertionError, "broken");
  assert(true, "holds");
});

Deno.test("toBlksnapError() keeps the errno of Deno's errors and defaults to EIO", () => {
  assertEquals(toBlksnapError(new Deno.errors.NotFound("x"), "open").code, "ENOENT");
  assertEquals(toBlksnapError(new Deno.errors.AlreadyExists("x"), "open").code, "EEXIST");
  assertEquals(toBlksnapError(new Error("boom"), "io").code, "EIO");
  const same = new BlksnapError("ENOSPC", "full");
  assertStrictEquals(toBlksnapError(same, "x"), same);
  assertThrows(() => toBlksnapError(new AssertionError("bug"), "x"), AssertionError);
});
