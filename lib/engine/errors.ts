/**
 * Errors of the engine.
 *
 * Two kinds, never mixed:
 * - {@linkcode BlksnapError}: an operating error (bad request, device failure,
 *   overflow). It carries an errno name and number, the way the kernel module
 *   returns `-errno` from an ioctl, so the daemon can reply with it.
 * - {@linkcode AssertionError}: a broken invariant, that is a bug. It is
 *   thrown by {@linkcode assert} and must never be caught to carry on.
 *
 * @module
 */

/** Linux errno numbers used by the engine (x86-64 / generic values). */
export const ERRNO = {
  EPERM: 1,
  ENOENT: 2,
  ESRCH: 3,
  EINTR: 4,
  EIO: 5,
  ENXIO: 6,
  EBADF: 9,
  EAGAIN: 11,
  ENOMEM: 12,
  EACCES: 13,
  EFAULT: 14,
  EBUSY: 16,
  EEXIST: 17,
  ENODEV: 19,
  ENOTDIR: 20,
  EISDIR: 21,
  EINVAL: 22,
  EFBIG: 27,
  ENOSPC: 28,
  EROFS: 30,
  ENODATA: 61,
  EOPNOTSUPP: 95,
  ETIMEDOUT: 110,
  EALREADY: 114,
} as const;

/** Name of an errno known to the engine, such as `"ENOSPC"`. */
export type ErrnoName = keyof typeof ERRNO;

/** Returns the errno name for a number, or `undefined` when unknown. */
export function errnoName(errno: number): ErrnoName | undefined {
  for (const [name, value] of Object.entries(ERRNO)) {
    if (value === errno) return name as ErrnoName;
  }
  return undefined;
}

/**
 * An operating error with an errno, e.g.
 * `new BlksnapError("ESRCH", "Snapshot 1234… not found")`.
 */
export class BlksnapError extends Error {
  /** The errno name, such as `"ENOSPC"` (like Node's `err.code`). */
  readonly code: ErrnoName;
  /** The positive errno number, such as 28. */
  readonly errno: number;

  constructor(code: ErrnoName, message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "BlksnapError";
    this.code = code;
    this.errno = ERRNO[code];
  }
}

/** A broken invariant: a bug in the engine or in its caller. */
export class AssertionError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "AssertionError";
  }
}

/** Throws an {@linkcode AssertionError} unless `condition` holds. */
export function assert(condition: unknown, message: string): asserts condition {
  if (!condition) throw new AssertionError(message);
}

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
