/**
 * Linux device numbers: the one decoder and encoder of `dev_t` in this
 * program. Pure: no FFI, usable by the engine, the daemon and the CLI.
 *
 * What each source gives:
 * - `Deno.stat()` / `Deno.fstat()` `dev` and `rdev`: glibc's 64-bit dev_t
 *   (Deno's std builds st_dev/st_rdev from statx's separate major and minor
 *   with makedev()), the "huge" encoding:
 *     major = ((dev >> 8) & 0xfff) | ((dev >> 32) & ~0xfff)
 *     minor = (dev & 0xff) | ((dev >> 12) & ~0xff)
 * - the kernel's 32-bit `new_encode_dev()` (what stat(2) reports when the
 *   kernel fills st_dev itself): `(minor & 0xff) | (major << 8) |
 *   ((minor & ~0xff) << 12)` with a 12-bit major and a 20-bit minor. That is
 *   the huge encoding restricted to the numbers the kernel can make, so
 *   {@linkcode decodeDevT} reads both.
 * - sysfs `dev` files, `/dev/block/MAJ:MIN`, /proc/self/mountinfo: the text
 *   "MAJ:MIN" ({@linkcode parseDeviceKey}, {@linkcode deviceKey}).
 *
 * @module
 */

export interface DeviceNumber {
  major: number;
  minor: number;
}

/** Largest major and minor glibc's dev_t holds (32 bits each). */
const MAX_PART = 0xffff_ffff;

/**
 * A dev_t (glibc's 64-bit encoding, or the kernel's 32-bit one) -> major and
 * minor. A `number` must be a non-negative safe integer: pass a bigint for
 * majors of 2^21 and more.
 */
export function decodeDevT(dev: number | bigint): DeviceNumber {
  if (typeof dev === "number" && !(Number.isSafeInteger(dev) && dev >= 0)) {
    throw new RangeError(`dev_t ${dev} is not a non-negative safe integer`);
  }
  const d = BigInt.asUintN(64, BigInt(dev));
  if (typeof dev === "bigint" && d !== dev) throw new RangeError(`dev_t ${dev} is not 64 bits`);
  const major = ((d >> 8n) & 0xfffn) | ((d >> 32n) & ~0xfffn);
  const minor = (d & 0xffn) | ((d >> 12n) & ~0xffn);
  return { major: Number(major & 0xffff_ffffn), minor: Number(minor & 0xffff_ffffn) };
}

/** major and minor -> glibc's 64-bit dev_t (makedev(3)). */
export function encodeDevT(n: DeviceNumber): bigint {
  checkPart(n.major, "major");
  checkPart(n.minor, "minor");
  const major = BigInt(n.major);
  const minor = BigInt(n.minor);
  return ((major & 0xfffn) << 8n) | ((major & ~0xfffn) << 32n) | (minor & 0xffn) |
    ((minor & ~0xffn) << 12n);
}

/** "MAJ:MIN", as sysfs and /dev/block/ write it. */
export function deviceKey(n: DeviceNumber): string {
  return `${n.major}:${n.minor}`;
}

/** "MAJ:MIN" -> major and minor; undefined when the text is not one. */
export function parseDeviceKey(key: string): DeviceNumber | undefined {
  const m = /^(\d{1,10}):(\d{1,10})$/.exec(key);
  if (!m) return undefined;
  const n = { major: Number(m[1]), minor: Number(m[2]) };
  return n.major <= MAX_PART && n.minor <= MAX_PART ? n : undefined;
}

/** "MAJ:MIN" of a dev_t as `Deno.stat()` gives it. */
export function devTKey(dev: number | bigint): string {
  return deviceKey(decodeDevT(dev));
}

function checkPart(v: number, what: string): void {
  if (!Number.isInteger(v) || v < 0 || v > MAX_PART) {
    throw new RangeError(`${what} ${v} is outside 0..${MAX_PART}`);
  }
}
