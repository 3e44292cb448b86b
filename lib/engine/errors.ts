/**
 * Errors of the engine.
 *
 * Two kinds, never mixed:
 * - {@linkcode BlksnapError}: an operating error (bad request, device failure,
 *   overflow). It carries an errno name and number, the way the kernel module
 *   returns `-errno` from an ioctl, so the daemon can reply with it. It is
 *   defined in ffi/errno.ts, below every layer, and re-exported here for the
 *   engine's modules.
 * - {@linkcode AssertionError}: a broken invariant, that is a bug. It is
 *   thrown by {@linkcode assert} and must never be caught to carry on.
 *
 * ffi/errno.ts is the one module of ffi/ the engine imports: it is pure data
 * and classes, loads no library and needs no --allow-ffi.
 *
 * @module
 */

import { BlksnapError, ERRNO, type ErrnoName } from "../../ffi/errno.ts";
import { AssertionError } from "../assert.ts";

export { BlksnapError, ERRNO, type ErrnoName, errnoName } from "../../ffi/errno.ts";
export { assert, AssertionError } from "../assert.ts";

/**
 * Converts any error thrown by I/O into a {@linkcode BlksnapError}, keeping
 * the errno of Deno's error classes where one is known and EIO otherwise.
 * Assertion errors pass through unchanged: a bug stays a bug.
 */
export function toBlksnapError(error: unknown, context: string): BlksnapError {
  if (error instanceof AssertionError) throw error;
  if (error instanceof BlksnapError) return error;
  const message = error instanceof Error ? error.message : String(error);
  return new BlksnapError(denoErrno(error), `${context}: ${message}`, { cause: error });
}

function denoErrno(error: unknown): ErrnoName {
  if (error instanceof Deno.errors.NotFound) return "ENOENT";
  if (error instanceof Deno.errors.AlreadyExists) return "EEXIST";
  if (error instanceof Deno.errors.PermissionDenied) return "EACCES";
  if (error instanceof Deno.errors.Busy) return "EBUSY";
  if (error instanceof Deno.errors.NotADirectory) return "ENOTDIR";
  if (error instanceof Deno.errors.IsADirectory) return "EISDIR";
  if (error instanceof Deno.errors.InvalidData) return "EINVAL";
  if (error instanceof Deno.errors.TimedOut) return "ETIMEDOUT";
  if (error instanceof Deno.errors.Interrupted) return "EINTR";
  if (error instanceof Deno.errors.NotSupported) return "EOPNOTSUPP";
  const code = (error as { code?: unknown } | null)?.code;
  if (typeof code === "string" && code in ERRNO) return code as ErrnoName;
  return "EIO";
}
