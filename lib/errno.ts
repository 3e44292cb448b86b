/**
 * errno names, numbers and descriptions (Linux x86-64), shared by the FFI
 * layer, the engine and the daemon. Pure data: no FFI here.
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
