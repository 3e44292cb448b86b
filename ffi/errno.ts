/**
 * errno, and the two error classes that carry one. The bottom of the import
 * graph: it imports nothing, and everything that reports an errno (ffi/, the
 * engine, the daemon, the CLI) imports it. Pure data and classes: loading it
 * opens no library and needs no --allow-ffi, so the engine may use it.
 *
 * - {@linkcode ErrnoError}: a failed system or library call. liburing returns
 *   `-errno`; libc returns -1 and sets errno. Both become an `ErrnoError`
 *   naming the call: `open("/dev/sdb"): EBUSY (Device or resource busy)`.
 * - {@linkcode BlksnapError}: an operating error of this program (bad
 *   request, device failure, overflow) with the errno it answers with, the
 *   way the kernel module returns `-errno` from an ioctl. The daemon replies
 *   with it; the CLI exits with it.
 *
 * Assertion failures (bugs) are neither: see lib/assert.ts.
 *
 * @module
 */

/** Linux x86-64 errno numbers used by this program (asm-generic/errno-base.h, errno.h). */
export const ERRNO = {
  EPERM: 1,
  ENOENT: 2,
  ESRCH: 3,
  EINTR: 4,
  EIO: 5,
  ENXIO: 6,
  E2BIG: 7,
  EBADF: 9,
  EAGAIN: 11,
  ENOMEM: 12,
  EACCES: 13,
  EFAULT: 14,
  ENOTBLK: 15,
  EBUSY: 16,
  EEXIST: 17,
  EXDEV: 18,
  ENODEV: 19,
  ENOTDIR: 20,
  EISDIR: 21,
  EINVAL: 22,
  ENFILE: 23,
  EMFILE: 24,
  ENOTTY: 25,
  EFBIG: 27,
  ENOSPC: 28,
  ESPIPE: 29,
  EROFS: 30,
  EPIPE: 32,
  ERANGE: 34,
  ENAMETOOLONG: 36,
  ENOSYS: 38,
  ENOTEMPTY: 39,
  ENODATA: 61,
  ETIME: 62,
  EPROTO: 71,
  EBADMSG: 74,
  EOVERFLOW: 75,
  EOPNOTSUPP: 95,
  EADDRINUSE: 98,
  ECONNREFUSED: 111,
  EALREADY: 114,
  EINPROGRESS: 115,
  ETIMEDOUT: 110,
  ECANCELED: 125,
} as const;

export type ErrnoName = keyof typeof ERRNO;

const DESCRIPTIONS: Partial<Record<ErrnoName, string>> = {
  EPERM: "Operation not permitted",
  ENOENT: "No such file or directory",
  ESRCH: "No such process",
  EIO: "Input/output error",
  ENXIO: "No such device or address",
  EAGAIN: "Resource temporarily unavailable",
  ENOMEM: "Cannot allocate memory",
  EACCES: "Permission denied",
  ENOTBLK: "Block device required",
  EBUSY: "Device or resource busy",
  EEXIST: "File exists",
  ENODEV: "No such device",
  ENOTDIR: "Not a directory",
  EISDIR: "Is a directory",
  EINVAL: "Invalid argument",
  ENOTTY: "Inappropriate ioctl for device",
  ENOSPC: "No space left on device",
  EROFS: "Read-only file system",
  ENOSYS: "Function not implemented",
  EOPNOTSUPP: "Operation not supported",
  EALREADY: "Operation already in progress",
  ETIMEDOUT: "Connection timed out",
  ECANCELED: "Operation canceled",
  EPROTO: "Protocol error",
};

const NAMES = new Map<number, ErrnoName>(
  Object.entries(ERRNO).map(([name, num]) => [num, name as ErrnoName]),
);

/** `ENOENT` for 2 (or -2); `undefined` for numbers this table does not know. */
export function errnoName(errno: number): ErrnoName | undefined {
  return NAMES.get(Math.abs(errno));
}

/** Human description, as strerror(3) would say it. */
export function errnoDescription(errno: number): string {
  const name = NAMES.get(Math.abs(errno));
  return (name && DESCRIPTIONS[name]) ?? `errno ${Math.abs(errno)}`;
}

/** A failed system or library call: carries the positive errno and the call's name. */
export class ErrnoError extends Error {
  readonly errno: number;
  readonly code: string;
  readonly call: string;

  constructor(call: string, errno: number, detail?: string) {
    const positive = Math.abs(errno);
    const message =
      `${call}: ${errnoName(positive) ?? `E${positive}`} (${errnoDescription(positive)})` +
      (detail ? `: ${detail}` : "");
    super(message);
    this.name = "ErrnoError";
    this.errno = positive;
    this.code = errnoName(positive) ?? `E${positive}`;
    this.call = call;
  }
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

  /**
   * A failed call as the operating error to answer with: its errno (EIO when
   * the table has no name for it), `message`, and the call's error as cause.
   */
  static fromErrno(err: ErrnoError, message: string): BlksnapError {
    const code = Object.hasOwn(ERRNO, err.code) ? err.code as ErrnoName : "EIO";
    return new BlksnapError(code, message, { cause: err });
  }
}
