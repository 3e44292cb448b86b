/**
 * The control socket's protocol: one JSON object per line in each direction.
 *
 *   request:  {"v":1,"id":7,"op":"attach","args":{"device":"/dev/loop0"}}
 *   reply:    {"v":1,"id":7,"ok":true,"result":{...}}
 *             {"v":1,"id":7,"ok":false,"error":{"code":"EBUSY","errno":16,"message":"..."}}
 *
 * `v` is the protocol version; a daemon answers a request of another version
 * with EPROTO and does nothing. `id` numbers the requests of a connection and
 * is echoed. Every request is validated here before any handler sees it.
 */
import { BlksnapError } from "../../ffi/errno.ts";
import type { Params } from "../engine/params.ts";
import type { QueueStats } from "../ublk/device.ts";

export const PROTOCOL_VERSION = 1;
/** Where the daemon listens unless told otherwise (--socket, $BLKSNAP_SOCKET). */
export const DEFAULT_SOCKET_PATH = "/run/blksnap/control.sock";
/** Longest request line accepted; longer input is an error, not a buffer. */
export const MAX_LINE_BYTES = 64 * 1024;

/** A range of 512-byte sectors. */
export interface SectorRange {
  sector: number;
  count: number;
}

export type Request =
  | { op: "ping"; args: Record<string, never> }
  | { op: "version"; args: Record<string, never> }
  | { op: "status"; args: Record<string, never> }
  | { op: "attach"; args: { device: string } }
  | { op: "detach"; args: { device: string } }
  /** Retries the take-over of every device a dead daemon left that is not recovered yet. */
  | { op: "recover"; args: Record<string, never> }
  /**
   * detach, and for a device a dead daemon left that could not be recovered:
   * delete it (refused while it is mounted; I/O waiting on it fails).
   */
  | { op: "detach_force"; args: { device: string } }
  | { op: "shutdown"; args: Record<string, never> }
  /**
   * Exit leaving every tracked device quiesced for the next daemon (an
   * upgrade). Refused while snapshots are held unless `force` (they are lost).
   */
  | { op: "handover"; args: { force: boolean } }
  | { op: "cbtinfo"; args: { device: string } }
  | { op: "readcbtmap"; args: { device: string } }
  | { op: "markdirtyblock"; args: { device: string; ranges: SectorRange[] } }
  | {
    op: "snapshot_create";
    /**
     * `storage` is a regular file, a directory (an unnamed O_TMPFILE file is
     * made in it) or a block device; the daemon opens it as
     * `/proc/<clientPid>/root/<storage>` because it runs in a private mount
     * namespace.
     *
     * `session` (optional, default false) ties the snapshot to the
     * connection that created it: the daemon destroys it when that
     * connection closes, for whatever reason (the client exited, was
     * killed, or gave up on a reply), unless it was destroyed before. A
     * backup uses it so that being killed at any point leaks no snapshot;
     * `blksnap snapshot_create` does not, so its snapshots outlive the CLI.
     */
    args: {
      devices: string[];
      storage: string;
      limitBytes: number;
      clientPid: number;
      session?: boolean;
    };
  }
  | { op: "snapshot_add"; args: { id: string; device: string } }
  | { op: "snapshot_take"; args: { id: string } }
  | { op: "snapshot_destroy"; args: { id: string } }
  | { op: "snapshot_collect"; args: Record<string, never> }
  | { op: "snapshot_info"; args: { device: string } }
  | { op: "snapshot_waitevent"; args: { id: string; timeoutMs: number } };

export type Op = Request["op"];
/** The arguments of one operation. */
export type ArgsOf<O extends Op> = Extract<Request, { op: O }>["args"];

export interface Envelope {
  v: number;
  id: number;
  op: Op;
  args: Request["args"];
}

export interface ErrorBody {
  code: string;
  errno: number;
  message: string;
}

export type Reply =
  | { v: number; id: number; ok: true; result: unknown }
  | { v: number; id: number; ok: false; error: ErrorBody };

// ---------------------------------------------------------------------------
// Results: the `result` of a successful reply, per operation. The CLI and the
// daemon both take these shapes from here.

export type { QueueStats };

export interface PingResult {
  pong: true;
}

export interface ShutdownResult {
  stopping: true;
}

export interface HandoverResult {
  /** The daemon that exits. */
  pid: number;
  /** Tracked devices left quiesced for the next daemon. */
  devices: number;
  /** Snapshots lost with the handover (only with force). */
  snapshotsLost: number;
}

export interface VersionResult {
  version: string;
  protocol: number;
  pid: number;
  ublkFeatures: string[];
  ioctlEncoding: boolean;
}

/** A tracked device (the result of attach and detach). */
export interface TrackedInfo {
  /** The original's path as given to attach. */
  original: string;
  /** The original's MAJ:MIN. */
  originalDevice: string;
  /** The tracked device, /dev/ublkbN. */
  tracked: string;
  trackedDevice: string;
  ublkId: number;
  sizeBytes: number;
  logicalBlockSize: number;
  physicalBlockSize: number;
  queues: number;
  queueDepth: number;
  userRecovery: boolean;
  /** The original is read-only, and so is the tracked device (UBLK_ATTR_READ_ONLY). */
  readOnly: boolean;
  attachedAt: string;
}

/** A device's change tracker, as `status` shows it. */
export interface CbtSummary {
  blockSize: number;
  blockCount: number;
  generationId: string;
  changesNumber: number;
}

export interface DeviceStatus extends TrackedInfo {
  queueStats: QueueStats[];
  /** Absent from daemons without CBT. */
  cbt?: CbtSummary;
}

export interface ForeignDevice {
  ublkId: number;
  state: string;
  pid: number;
  pidAlive: boolean;
}

export interface StorageStatus {
  /** The path given to snapshot_create (a directory for "tmpfile"). */
  path: string;
  kind: "file" | "tmpfile" | "blockdev";
  /**
   * "direct" (O_DIRECT: a block device whose logical block size divides every
   * request the snapshot makes of it) or "buffered" (through the page cache).
   * Decided at the take: "buffered" until then.
   */
  io: "direct" | "buffered";
  capacityBytes: number;
  filledBytes: number;
  limitBytes: number;
}

export interface SnapshotDeviceStatus {
  original: string;
  tracked: string;
  /** The snapshot image once taken, else null. */
  image: string | null;
}

export interface SnapshotStatus {
  id: string;
  taken: boolean;
  takenAt: string | null;
  /** 0, or the negative errno that corrupted the snapshot. */
  errorCode: number;
  devices: SnapshotDeviceStatus[];
  storage: StorageStatus;
}

/** What the daemon found at its start that an earlier daemon left (state file, owner tags). */
export interface RecoveryReport {
  /** The state file it read ("" when there was none). */
  stateFile: string;
  /** Why the state file could not be used, or null. */
  stateFileError: string | null;
  /** The pid of the daemon that wrote it, or 0. */
  previousPid: number;
  /** Tracked devices taken over, with their CBT map unless it could not be trusted. */
  recovered: Array<{
    original: string;
    tracked: string;
    ublkId: number;
    previousGenerationId: string;
    generationId: string;
    /** Why the CBT map was reset with a new generation id; null when it was kept. */
    cbtResetReason: string | null;
    /** START_USER_RECOVERY to END_USER_RECOVERY. */
    recoveryMs: number;
  }>;
  /** Tracked devices left as the kernel has them; `hint` says what to do. */
  unrecovered: Array<{
    original: string;
    originalDevice: string;
    tracked: string;
    ublkId: number;
    reason: string;
    hint: string;
  }>;
  /** Devices deleted: snapshot images, and devices that never started. */
  removed: Array<{ ublkId: number; role: string; original: string; reason: string }>;
  /** Snapshots that existed when the previous daemon died: corrupted, gone. */
  lostSnapshots: Array<{ id: string; devices: string[]; storage: string; reason: string }>;
}

export interface StatusResult extends VersionResult {
  foreignDevices: ForeignDevice[];
  /** Absent from daemons without recovery. */
  recovery?: RecoveryReport;
  startedAt: string;
  socket: string;
  params?: Params;
  devices: DeviceStatus[];
  /** Absent from daemons without snapshots. */
  snapshots?: SnapshotStatus[];
}

export interface CbtInfoResult {
  /** The original's path as tracked. */
  device: string;
  /** The tracked device, /dev/ublkbN. */
  tracked: string;
  /** Bytes per CBT block. */
  blockSize: number;
  /** Bytes. */
  deviceCapacity: number;
  blockCount: number;
  /** A UUID; a new one whenever the map is reset. */
  generationId: string;
  /** 0..255: the change number of the last snapshot taken. */
  changesNumber: number;
}

export interface ReadCbtMapResult extends CbtInfoResult {
  /** base64 of blockCount bytes: the frozen (read) map, one change number per block. */
  map: string;
}

export interface MarkDirtyResult {
  device: string;
  tracked: string;
  ranges: SectorRange[];
}

export interface SnapshotCreateResult {
  id: string;
}

export interface SnapshotAddResult {
  id: string;
  device: string;
  tracked: string;
  /** True when snapshot_add attached the device first. */
  attached: boolean;
}

export interface SnapshotImage {
  original: string;
  tracked: string;
  image: string;
}

export interface SnapshotTakeResult {
  id: string;
  images: SnapshotImage[];
  /** The devices that were frozen (e.g. mount points) while the snapshot was taken. */
  frozen: string[];
}

export interface SnapshotDestroyResult {
  id: string;
}

export interface SnapshotCollectResult {
  ids: string[];
}

export interface SnapshotInfoResult {
  device: string;
  /** The snapshot the device belongs to, or null. */
  id: string | null;
  /** 0, or the negative errno that corrupted the snapshot. */
  errorCode: number;
  /** The snapshot image's path, or "" when not taken. */
  image: string;
}

/** Event codes (the kernel's blksnap_event_code). */
export const EVENT_CODE = { corrupted: 0, no_space: 1 } as const;

export type WaitEventResult =
  | { result: "timeout" }
  | {
    result: "ok";
    /** ms since the epoch. */
    time: number;
    event: "corrupted";
    code: 0;
    /** MAJ:MIN of the original. */
    device: string;
    /** The errno, positive as the module's event carries it (snapshot_info's is negative). */
    errorCode: number;
  }
  | {
    result: "ok";
    time: number;
    event: "no_space";
    code: 1;
    /** The size the difference storage asked to grow to, in sectors. */
    requestedSectors: number;
  };

/** The result type of each operation. */
export interface ResultMap {
  ping: PingResult;
  version: VersionResult;
  status: StatusResult;
  attach: TrackedInfo;
  detach: TrackedInfo;
  recover: RecoveryReport;
  detach_force: { device: string; tracked: string; ublkId: number };
  shutdown: ShutdownResult;
  handover: HandoverResult;
  cbtinfo: CbtInfoResult;
  readcbtmap: ReadCbtMapResult;
  markdirtyblock: MarkDirtyResult;
  snapshot_create: SnapshotCreateResult;
  snapshot_add: SnapshotAddResult;
  snapshot_take: SnapshotTakeResult;
  snapshot_destroy: SnapshotDestroyResult;
  snapshot_collect: SnapshotCollectResult;
  snapshot_info: SnapshotInfoResult;
  snapshot_waitevent: WaitEventResult;
}

export type ResultOf<O extends Op> = ResultMap[O];

/** The reply body of an operating error. */
export function errorBody(err: BlksnapError): ErrorBody {
  return { code: err.code, errno: err.errno, message: err.message };
}

/** What an argument must be; each kind has one validator below. */
type ArgKind =
  /** A non-empty absolute path. */
  | "path"
  /** An array of 0..MAX_DEVICES paths. */
  | "paths"
  /** A UUID, 8-4-4-4-12 hex digits (canonicalised to lower case). */
  | "uuid"
  /** A safe integer >= 0 (the daemon refuses 0 itself, with a better message). */
  | "bytes"
  /** A safe integer > 0. */
  | "pid"
  /** A safe integer 0..2^31-1. */
  | "timeout"
  /** A non-empty array of at most MAX_RANGES {sector, count}. */
  | "ranges"
  /** true or false. */
  | "flag"
  /** true or false, or absent (then left out of the parsed args). */
  | "optionalFlag";

/** Most devices in one snapshot_create. */
export const MAX_DEVICES = 64;
/** Most ranges in one markdirtyblock (a request line is limited to MAX_LINE_BYTES too). */
export const MAX_RANGES = 65536;
/** Longest snapshot_waitevent wait. */
export const MAX_TIMEOUT_MS = 2 ** 31 - 1;

const ARG_SPECS: Record<Op, Record<string, ArgKind>> = {
  ping: {},
  version: {},
  status: {},
  attach: { device: "path" },
  detach: { device: "path" },
  recover: {},
  detach_force: { device: "path" },
  shutdown: {},
  handover: { force: "flag" },
  cbtinfo: { device: "path" },
  readcbtmap: { device: "path" },
  markdirtyblock: { device: "path", ranges: "ranges" },
  snapshot_create: {
    devices: "paths",
    storage: "path",
    limitBytes: "bytes",
    clientPid: "pid",
    session: "optionalFlag",
  },
  snapshot_add: { id: "uuid", device: "path" },
  snapshot_take: { id: "uuid" },
  snapshot_destroy: { id: "uuid" },
  snapshot_collect: {},
  snapshot_info: { device: "path" },
  snapshot_waitevent: { id: "uuid", timeoutMs: "timeout" },
};

export const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

/** Parses and validates one request line; throws BlksnapError (EPROTO/EINVAL) when bad. */
export function parseRequest(line: string): Envelope {
  let raw: unknown;
  try {
    raw = JSON.parse(line);
  } catch {
    throw new BlksnapError("EPROTO", "Malformed request: not JSON");
  }
  if (typeof raw !== "object" || raw === null || Array.isArray(raw)) {
    throw new BlksnapError("EPROTO", "Malformed request: not a JSON object");
  }
  const r = raw as Record<string, unknown>;
  if (r.v !== PROTOCOL_VERSION) {
    throw new BlksnapError(
      "EPROTO",
      `Unsupported protocol version ${JSON.stringify(r.v)}; this daemon speaks ${PROTOCOL_VERSION}`,
    );
  }
  if (typeof r.id !== "number" || !Number.isSafeInteger(r.id) || r.id < 0) {
    throw new BlksnapError("EPROTO", "Malformed request: id must be a non-negative integer");
  }
  if (typeof r.op !== "string" || !Object.hasOwn(ARG_SPECS, r.op)) {
    throw new BlksnapError("EINVAL", `Unknown operation ${JSON.stringify(r.op)}`);
  }
  const op = r.op as Op;
  const args = r.args ?? {};
  if (typeof args !== "object" || args === null || Array.isArray(args)) {
    throw new BlksnapError("EINVAL", `Operation "${op}": args must be an object`);
  }
  const spec = ARG_SPECS[op];
  const a = args as Record<string, unknown>;
  for (const key of Object.keys(a)) {
    if (!Object.hasOwn(spec, key)) {
      throw new BlksnapError("EINVAL", `Operation "${op}": unknown argument "${key}"`);
    }
  }
  const out: Record<string, unknown> = {};
  for (const [key, kind] of Object.entries(spec)) {
    if (kind === "optionalFlag" && a[key] === undefined) continue;
    out[key] = VALIDATORS[kind](a[key], (what) => bad(op, key, what, a[key]));
  }
  return { v: PROTOCOL_VERSION, id: r.id, op, args: out as Request["args"] };
}

type Fail = (what: string) => never;

function bad(op: string, key: string, what: string, value: unknown): never {
  throw new BlksnapError(
    "EINVAL",
    `Operation "${op}": argument "${key}" must be ${what}, not ${describe(value)}`,
  );
}

function describe(value: unknown): string {
  if (value === undefined) return "missing";
  const s = JSON.stringify(value) ?? String(value);
  return s.length > 60 ? `${s.slice(0, 57)}...` : s;
}

function isInteger(v: unknown, min: number, max = Number.MAX_SAFE_INTEGER): v is number {
  return typeof v === "number" && Number.isSafeInteger(v) && v >= min && v <= max;
}

// Paths are resolved by the client: the daemon's working directory means nothing to it.
function path(v: unknown, fail: Fail): string {
  if (typeof v !== "string" || v.length === 0) return fail("a non-empty string");
  if (!v.startsWith("/")) return fail("an absolute path");
  if (v.includes("\0")) return fail("a path without NUL bytes");
  return v;
}

const VALIDATORS: Record<ArgKind, (v: unknown, fail: Fail) => unknown> = {
  path,
  paths(v, fail) {
    if (!Array.isArray(v) || v.length > MAX_DEVICES) {
      return fail(`an array of at most ${MAX_DEVICES} absolute paths`);
    }
    return v.map((p: unknown) => path(p, fail));
  },
  uuid(v, fail) {
    if (typeof v !== "string" || !UUID_RE.test(v)) return fail("a UUID (8-4-4-4-12 hex digits)");
    return v.toLowerCase();
  },
  bytes(v, fail) {
    if (!isInteger(v, 0)) return fail("an integer >= 0");
    return v;
  },
  pid(v, fail) {
    if (!isInteger(v, 1)) return fail("an integer > 0");
    return v;
  },
  flag(v, fail) {
    if (typeof v !== "boolean") return fail("true or false");
    return v;
  },
  optionalFlag(v, fail) {
    if (typeof v !== "boolean") return fail("true or false (or absent)");
    return v;
  },
  timeout(v, fail) {
    if (!isInteger(v, 0, MAX_TIMEOUT_MS)) return fail(`an integer from 0 to ${MAX_TIMEOUT_MS}`);
    return v;
  },
  ranges(v, fail) {
    if (!Array.isArray(v) || v.length === 0 || v.length > MAX_RANGES) {
      return fail(`a non-empty array of at most ${MAX_RANGES} {sector, count}`);
    }
    return v.map((r: unknown) => {
      if (typeof r !== "object" || r === null || Array.isArray(r)) {
        return fail("an array of {sector, count} objects");
      }
      const o = r as Record<string, unknown>;
      const keys = Object.keys(o);
      if (keys.length !== 2 || !Object.hasOwn(o, "sector") || !Object.hasOwn(o, "count")) {
        return fail("an array of objects with exactly the keys sector and count");
      }
      if (!isInteger(o.sector, 0) || !isInteger(o.count, 1)) {
        return fail("ranges of integers, sector >= 0 and count >= 1");
      }
      return { sector: o.sector, count: o.count };
    });
  },
};

/** The id of a request line, when one can be read, for error replies. */
export function salvageId(line: string): number {
  try {
    const r = JSON.parse(line);
    if (typeof r?.id === "number" && Number.isSafeInteger(r.id)) return r.id;
  } catch {
    // fall through
  }
  return 0;
}
