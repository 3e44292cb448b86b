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
import { BlksnapError } from "../engine/errors.ts";

export const PROTOCOL_VERSION = 1;
/** Longest request line accepted; longer input is an error, not a buffer. */
export const MAX_LINE_BYTES = 64 * 1024;

export type Request =
  | { op: "ping"; args: Record<string, never> }
  | { op: "version"; args: Record<string, never> }
  | { op: "status"; args: Record<string, never> }
  | { op: "attach"; args: { device: string } }
  | { op: "detach"; args: { device: string } }
  | { op: "shutdown"; args: Record<string, never> };

export type Op = Request["op"];

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

/** The reply body of an operating error. */
export function errorBody(err: BlksnapError): ErrorBody {
  return { code: err.code, errno: err.errno, message: err.message };
}

const ARG_SPECS: Record<Op, Record<string, "string">> = {
  ping: {},
  version: {},
  status: {},
  attach: { device: "string" },
  detach: { device: "string" },
  shutdown: {},
};

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
  for (const [key, type] of Object.entries(spec)) {
    if (typeof a[key] !== type || (type === "string" && (a[key] as string).length === 0)) {
      throw new BlksnapError("EINVAL", `Operation "${op}": argument "${key}" must be a ${type}`);
    }
  }
  // Paths are resolved by the client: the daemon's working directory means nothing to it.
  if (typeof a.device === "string" && !a.device.startsWith("/")) {
    throw new BlksnapError(
      "EINVAL",
      `Operation "${op}": device must be an absolute path, not "${a.device}"`,
    );
  }
  return { v: PROTOCOL_VERSION, id: r.id, op, args: a as Request["args"] };
}

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
