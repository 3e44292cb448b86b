/**
 * Layout of the 64-bit `user_data` of every SQE this program submits. Only the
 * low 32 bits are used, so the hot path never builds a BigInt:
 *
 *   bits  0..15  tag (ublk tag, or a slot index for non-ublk work)
 *   bits 16..23  kind (below)
 *   bits 24..31  sub-index (e.g. the piece of a split request); 0 when unused
 *   bits 32..63  zero
 */
export const UD_KIND = {
  /** A ublk FETCH_REQ or COMMIT_AND_FETCH_REQ for `tag`. */
  UBLK_CMD: 1,
  /** Target I/O (read, write, fsync, fallocate) on behalf of `tag`. */
  TARGET_IO: 2,
  /** A control-plane command. */
  CTRL: 3,
  /** Start-up self-check NOP. */
  NOP: 4,
  /** The eventfd wake-up read. */
  WAKE: 5,
} as const;

export function packUserData(kind: number, tag: number, sub = 0): number {
  return ((sub & 0xff) << 24 | (kind & 0xff) << 16 | (tag & 0xffff)) >>> 0;
}

export function udTag(userData: number): number {
  return userData & 0xffff;
}

export function udKind(userData: number): number {
  return (userData >>> 16) & 0xff;
}

export function udSub(userData: number): number {
  return (userData >>> 24) & 0xff;
}
