/**
 * The owner tag: what this program writes into `ublksrv_flags` of every ublk
 * device it adds. The kernel keeps that 64-bit field for the server and
 * returns it unchanged in GET_DEV_INFO, so any daemon can tell, from the
 * kernel alone, that a device is blksnap's, whether it is a tracked device or
 * a snapshot image, and which original it stacks on — even when the state
 * file is lost. It is what keeps an original from getting a second tracked
 * device after a crash.
 *
 * | bits  | field                                     |
 * |------:|-------------------------------------------|
 * | 63-48 | magic 0xb5a9                              |
 * | 35-32 | role: 1 tracked device, 2 snapshot image  |
 * | 31-20 | the original's major (12 bits)            |
 * | 19-0  | the original's minor (20 bits)            |
 *
 * The kernel's dev_t has 12 bits of major and 20 of minor: every device
 * number fits.
 */
import { assert } from "../assert.ts";

const MAGIC = 0xb5a9n;
export const OWNER_ROLE = { tracked: 1, image: 2 } as const;
export type OwnerRole = keyof typeof OWNER_ROLE;

export interface OwnerTag {
  role: OwnerRole;
  /** "MAJ:MIN" of the original. */
  originalDevice: string;
}

export function encodeOwnerTag(tag: OwnerTag): bigint {
  const m = /^(\d+):(\d+)$/.exec(tag.originalDevice);
  assert(m !== null, `bad device key "${tag.originalDevice}"`);
  const major = BigInt(m[1]!);
  const minor = BigInt(m[2]!);
  assert(major < 1n << 12n && minor < 1n << 20n, `device ${tag.originalDevice} out of range`);
  return (MAGIC << 48n) | (BigInt(OWNER_ROLE[tag.role]) << 32n) | (major << 20n) | minor;
}

/** The tag in `flags`, or null when the device is not this program's. */
export function decodeOwnerTag(flags: bigint): OwnerTag | null {
  if (flags >> 48n !== MAGIC) return null;
  const roleBits = Number((flags >> 32n) & 0xfn);
  const role = roleBits === OWNER_ROLE.tracked
    ? "tracked"
    : roleBits === OWNER_ROLE.image
    ? "image"
    : null;
  if (role === null) return null;
  // Bits 47-36 are zero in every tag this program writes.
  if (((flags >> 36n) & 0xfffn) !== 0n) return null;
  const major = Number((flags >> 20n) & 0xfffn);
  const minor = Number(flags & 0xfffffn);
  return { role, originalDevice: `${major}:${minor}` };
}
