/**
 * The one error class every FFI call site uses.
 *
 * liburing returns `-errno`; libc returns -1 and sets errno. Both become an
 * `ErrnoError` naming the call, so a message reads like
 * `open("/dev/sdb"): EBUSY (Device or resource busy)`.
 */
import { errnoDescription, errnoName } from "../lib/errno.ts";

export { ERRNO, errnoDescription, type ErrnoName, errnoName } from "../lib/errno.ts";

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
