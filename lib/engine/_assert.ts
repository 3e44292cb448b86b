/**
 * Test assertions over `node:assert/strict` (JSR's @std/assert is not
 * reachable from here), shaped like @std/assert.
 *
 * @module
 */

import nodeAssert from "node:assert/strict";
import { BlksnapError, type ErrnoName } from "./errors.ts";

// deno-lint-ignore no-explicit-any
type ErrorClass<E extends Error> = new (...args: any[]) => E;

export function assertEquals<T>(actual: T, expected: T, message?: string): void {
  nodeAssert.deepStrictEqual(actual, expected, message);
}

export function assertNotEquals<T>(actual: T, expected: T, message?: string): void {
  nodeAssert.notDeepStrictEqual(actual, expected, message);
}

export function assertStrictEquals<T>(actual: T, expected: T, message?: string): void {
  nodeAssert.strictEqual(actual, expected, message);
}

export function assertTrue(condition: unknown, message?: string): asserts condition {
  nodeAssert.ok(condition, message);
}

export function assertInstanceOf<E>(
  value: unknown,
  // deno-lint-ignore no-explicit-any
  type: new (...args: any[]) => E,
  message?: string,
): asserts value is E {
  nodeAssert.ok(value instanceof type, message ?? `Expected an instance of ${type.name}`);
}

export function assertThrows<E extends Error = Error>(
  fn: () => unknown,
  type?: ErrorClass<E>,
  includes?: string,
): E {
  try {
    fn();
  } catch (error) {
    checkError(error, type, includes);
    return error as E;
  }
  throw new nodeAssert.AssertionError({ message: "Expected the function to throw" });
}

export async function assertRejects<E extends Error = Error>(
  fn: () => PromiseLike<unknown>,
  type?: ErrorClass<E>,
  includes?: string,
): Promise<E> {
  try {
    await fn();
  } catch (error) {
    checkError(error, type, includes);
    return error as E;
  }
  throw new nodeAssert.AssertionError({ message: "Expected the promise to reject" });
}

/** Asserts that `fn` fails with a {@linkcode BlksnapError} of errno `code`. */
export async function assertErrno(
  fn: () => unknown,
  code: ErrnoName,
): Promise<BlksnapError> {
  try {
    await fn();
  } catch (error) {
    if (!(error instanceof BlksnapError)) throw error;
    nodeAssert.equal(error.code, code, `Expected ${code}, got ${error.code}: ${error.message}`);
    return error;
  }
  throw new nodeAssert.AssertionError({ message: `Expected ${code}, but nothing failed` });
}

function checkError(error: unknown, type?: ErrorClass<Error>, includes?: string): void {
  if (type !== undefined && !(error instanceof type)) {
    throw new nodeAssert.AssertionError({
      message: `Expected ${type.name}, got ${(error as Error)?.name}: ${(error as Error)?.message}`,
    });
  }
  if (includes !== undefined) {
    nodeAssert.ok(
      (error as Error).message.includes(includes),
      `Expected "${(error as Error).message}" to include "${includes}"`,
    );
  }
}
