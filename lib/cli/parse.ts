/**
 * Parsing the values of the tool's options: sizes with K/M/G/T suffixes,
 * sector ranges, snapshot UUIDs, timeouts. Every bad value is a UsageError
 * (exit 2) naming the option and the value.
 */
import { type Command, UsageError, type Values } from "./command.ts";
import { MAX_TIMEOUT_MS, type SectorRange, UUID_RE } from "../daemon/protocol.ts";

const SUFFIX: Record<string, number> = { "": 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3, T: 1024 ** 4 };

/**
 * A size in bytes: a whole number, optionally followed by K, M, G or T
 * (powers of 1024, either case). "0" is accepted (the daemon refuses it).
 */
export function parseSize(text: string, option: string): number {
  const m = /^(\d+)([KMGTkmgt]?)$/.exec(text);
  if (!m) {
    throw new UsageError(
      `--${option} must be a whole number of bytes with an optional K, M, G or T suffix ` +
        `(e.g. 512M), not "${text}"`,
    );
  }
  const bytes = Number(m[1]) * SUFFIX[m[2]!.toUpperCase()]!;
  if (!Number.isSafeInteger(bytes)) throw new UsageError(`--${option} ${text} is too large`);
  return bytes;
}

/**
 * Sector ranges `sector:count`: each value may hold several, separated by
 * spaces or commas. Counts are at least 1.
 */
export function parseRanges(texts: string[], option: string): SectorRange[] {
  const ranges: SectorRange[] = [];
  for (const text of texts) {
    for (const word of text.split(/[\s,]+/).filter((w) => w !== "")) {
      const m = /^(\d+):(\d+)$/.exec(word);
      const sector = Number(m?.[1]);
      const count = Number(m?.[2]);
      if (!m || !Number.isSafeInteger(sector) || !Number.isSafeInteger(count) || count < 1) {
        throw new UsageError(
          `--${option} takes sector:count with whole numbers and count >= 1 (e.g. 2048:8), ` +
            `not "${word}"`,
        );
      }
      ranges.push({ sector, count });
    }
  }
  return ranges;
}

/** A snapshot id (8-4-4-4-12 hex digits), in lower case. */
export function requireUuid(values: Values, name: string, cmd: Command): string {
  const v = values[name];
  if (typeof v !== "string" || v === "") throw new UsageError(`${cmd.name}: --${name} is required`);
  if (!UUID_RE.test(v)) {
    throw new UsageError(
      `${cmd.name}: --${name} must be a snapshot UUID like 01234567-89ab-cdef-0123-456789abcdef, ` +
        `not "${v}"`,
    );
  }
  return v.toLowerCase();
}

/** A timeout in milliseconds, 0..2^31-1. */
export function parseTimeout(text: string, option: string): number {
  const n = /^\d+$/.test(text) ? Number(text) : NaN;
  if (!Number.isSafeInteger(n) || n > MAX_TIMEOUT_MS) {
    throw new UsageError(
      `--${option} must be a whole number of milliseconds from 0 to ${MAX_TIMEOUT_MS}, ` +
        `not "${text}"`,
    );
  }
  return n;
}

/** Every value of a repeatable option (several options may feed one list). */
export function stringList(values: Values, ...names: string[]): string[] {
  const out: string[] = [];
  for (const name of names) {
    const v = values[name];
    const list = Array.isArray(v) ? v : v === undefined ? [] : [v];
    for (const item of list) {
      if (typeof item === "string") out.push(item);
    }
  }
  return out;
}
