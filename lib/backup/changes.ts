/**
 * Which parts of a device changed since the last backup, from the frozen CBT
 * map (`readcbtmap`: one change number per tracking block).
 *
 * The semantics, from `lib/engine/cbt_map.ts` (the module's `cbt_map`):
 * a write marks its blocks in the write map with the *active* number; a take
 * makes previous = active, active + 1, and copies the write map to the read
 * map. So after the take whose `changesNumber` is T, a block holds T when it
 * was written between the take before and this one, a smaller number when it
 * was written earlier, and 0 when never (marks only raise a block's number).
 * A backup made from the take with number P therefore misses exactly the
 * blocks whose number is greater than P.
 *
 * The numbers of one generation run 1, 2, ..., 254. The take that would make
 * the active number 256 starts a new generation: its changesNumber is 255, the
 * write map is zeroed and its read map is stale (the module's behaviour), so a
 * backup of that take is full (its generation id is new). The takes after it
 * in that generation are numbered 1, 2, ... again and mark on a zeroed map: in
 * the order of a generation, 255 comes first. `changeOrder` gives that order.
 *
 * @module
 */

/** A change number's place in its generation: 255 (the take that began it) is 0. */
export function changeOrder(changesNumber: number): number {
  return changesNumber === 255 ? 0 : changesNumber;
}

/** A half-open byte range [start, end). */
export interface ByteRange {
  start: number;
  end: number;
}

/**
 * The byte ranges of the blocks changed since the backup of change number
 * `since` (same generation), merged and rounded out to whole clusters, clipped
 * to the device.
 */
export function changedRanges(
  map: Uint8Array,
  since: number,
  blockBytes: number,
  sizeBytes: number,
  clusterBytes: number,
): ByteRange[] {
  const after = changeOrder(since);
  const out: ByteRange[] = [];
  for (let i = 0; i < map.length; i++) {
    if (map[i]! <= after) continue;
    const start = Math.floor((i * blockBytes) / clusterBytes) * clusterBytes;
    if (start >= sizeBytes) break;
    const end = Math.min(
      sizeBytes,
      Math.ceil(((i + 1) * blockBytes) / clusterBytes) * clusterBytes,
    );
    const last = out[out.length - 1];
    if (last !== undefined && start <= last.end) last.end = Math.max(last.end, end);
    else out.push({ start, end });
  }
  return out;
}

/** Total bytes of `ranges`. */
export function rangeBytes(ranges: ByteRange[]): number {
  let n = 0;
  for (const r of ranges) n += r.end - r.start;
  return n;
}

/**
 * Why the backup of a device must be full, or null when an incremental after
 * the previous point is correct.
 */
export function fullReason(
  previous: {
    generationId: string | null;
    changesNumber: number | null;
    sizeBytes: number;
    clusterBytes: number;
  } | undefined,
  current: {
    generationId: string | null;
    changesNumber: number | null;
    sizeBytes: number;
    clusterBytes: number;
  },
): string | null {
  if (previous === undefined) return "no earlier backup of this device in the directory";
  if (current.generationId === null || current.changesNumber === null) {
    return "no change map for this device";
  }
  if (previous.generationId === null || previous.changesNumber === null) {
    return "the previous backup has no change-tracking data";
  }
  if (previous.generationId !== current.generationId) {
    return `the change-tracking generation changed (${previous.generationId} -> ${current.generationId}: ` +
      "the map was reset or wrapped past 255 snapshots)";
  }
  if (changeOrder(current.changesNumber) <= changeOrder(previous.changesNumber)) {
    return `the change number did not advance (${previous.changesNumber} -> ${current.changesNumber})`;
  }
  if (previous.sizeBytes !== current.sizeBytes) {
    return `the device size changed (${previous.sizeBytes} -> ${current.sizeBytes} bytes)`;
  }
  if (previous.clusterBytes !== current.clusterBytes) {
    return `the cluster size changed (${previous.clusterBytes} -> ${current.clusterBytes})`;
  }
  return null;
}
