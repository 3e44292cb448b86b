/**
 * Snapshots: snapshot_create, snapshot_add, snapshot_take, snapshot_destroy,
 * snapshot_collect, snapshot_info, snapshot_waitevent, snapshot_watcher.
 *
 * Only snapshot_create starts the daemon when none runs (it may attach
 * devices); without a daemon no snapshot exists, so the others exit 3
 * (snapshot_collect prints nothing and exits 0).
 */
import { resolve } from "node:path";
import {
  type Command,
  CommandError,
  type Context,
  EXIT,
  noPositionals,
  requireString,
  UsageError,
} from "./command.ts";
import { parseSize, parseTimeout, requireUuid, stringList } from "./parse.ts";
import { DaemonError, NoDaemonError } from "../daemon/client.ts";
import { MAX_DEVICES, type WaitEventResult } from "../daemon/protocol.ts";
import { errnoDescription } from "../../ffi/errno.ts";

const NO_SNAPSHOT = "no snapshot exists";
const ID_HELP = "  -i, --id UUID         the snapshot (as snapshot_create printed it)";

export const snapshot_create: Command = {
  name: "snapshot_create",
  summary: "Create a snapshot of devices (not yet taken) and print its UUID.",
  usage: "blksnap snapshot_create [--device DEVICE...] --file PATH --limit SIZE",
  help: `Options:
  -d, --device DEVICE   a device to include: the original, its tracked device, or
                        /dev/block/MAJ:MIN; repeatable, and one -d takes several
                        devices as the following words. Optional: snapshot_add
                        adds devices later. An original that is not tracked yet
                        is attached first.
  -f, --file PATH       the difference storage (required): a regular file (grown
                        as needed, up to the limit), a directory (an
                        unnamed O_TMPFILE file is made in it and disappears with
                        the snapshot) or a block device (used whole). It must not
                        be on a device of the snapshot.
  -l, --limit SIZE      the most the difference storage may grow to (required):
                        bytes, or a number with K, M, G or T (powers of 1024)

Prints the new snapshot's UUID and nothing else. Then snapshot_take takes it.
Starts the daemon when it is not running.`,
  options: {
    device: { type: "string", short: "d", multiple: true },
    file: { type: "string", short: "f" },
    limit: { type: "string", short: "l" },
  },
  multitoken: ["device"],
  async run(ctx, values, positionals) {
    noPositionals(this, positionals);
    const storage = resolve(requireString(values, "file", this));
    const limitBytes = parseSize(requireString(values, "limit", this), "limit");
    const devices = stringList(values, "device").map((d) => {
      if (d === "") throw new UsageError(`${this.name}: --device must not be empty`);
      return resolve(d);
    });
    if (devices.length > MAX_DEVICES) {
      throw new UsageError(`${this.name}: at most ${MAX_DEVICES} devices in one snapshot`);
    }
    checkStorage(storage);
    const client = await ctx.daemon();
    const r = await ctx.call(client, "snapshot_create", {
      devices,
      storage,
      limitBytes,
      clientPid: Deno.pid,
    });
    ctx.print(r, r.id);
    return EXIT.OK;
  },
};

/** The difference storage must exist and be a regular file, a directory or a block device. */
function checkStorage(path: string): void {
  let info: Deno.FileInfo;
  try {
    info = Deno.statSync(path);
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) {
      throw new CommandError("ENOENT", `The difference storage "${path}" does not exist`);
    }
    throw new CommandError(
      "EIO",
      `Cannot stat the difference storage "${path}": ${(err as Error).message}`,
    );
  }
  if (!info.isFile && !info.isDirectory && !info.isBlockDevice) {
    throw new CommandError(
      "EINVAL",
      `The difference storage "${path}" must be a regular file, a directory or a block device`,
    );
  }
}

export const snapshot_add: Command = {
  name: "snapshot_add",
  summary: "Add a device to a snapshot that is not taken yet.",
  usage: "blksnap snapshot_add --id UUID --device DEVICE",
  help: `Options:
${ID_HELP}
  -d, --device DEVICE   the original, its tracked device, or /dev/block/MAJ:MIN;
                        an original that is not tracked yet is attached first

Prints nothing. Does not start the daemon: without one no snapshot exists (exit 3).`,
  options: { id: { type: "string", short: "i" }, device: { type: "string", short: "d" } },
  async run(ctx, values, positionals) {
    noPositionals(this, positionals);
    const id = requireUuid(values, "id", this);
    const device = resolve(requireString(values, "device", this));
    const client = await ctx.runningDaemon(NO_SNAPSHOT);
    ctx.print(await ctx.call(client, "snapshot_add", { id, device }), null);
    return EXIT.OK;
  },
};

export const snapshot_take: Command = {
  name: "snapshot_take",
  summary: "Take a snapshot: freeze, switch the change maps, start copy-on-write.",
  usage: "blksnap snapshot_take --id UUID",
  help: `Options:
${ID_HELP}

Filesystems mounted from the devices are frozen for the moment it takes. Prints
nothing; snapshot_info --field image then gives each device's snapshot image
(--json prints them). Does not start the daemon (exit 3 when none runs).`,
  options: { id: { type: "string", short: "i" } },
  async run(ctx, values, positionals) {
    noPositionals(this, positionals);
    const id = requireUuid(values, "id", this);
    const client = await ctx.runningDaemon(NO_SNAPSHOT);
    ctx.print(await ctx.call(client, "snapshot_take", { id }), null);
    return EXIT.OK;
  },
};

export const snapshot_destroy: Command = {
  name: "snapshot_destroy",
  summary: "Destroy a snapshot: remove its images and release its difference storage.",
  usage: "blksnap snapshot_destroy --id UUID",
  help: `Options:
${ID_HELP}

Prints nothing. The devices stay tracked and their change maps stay readable.
Does not start the daemon (exit 3 when none runs).`,
  options: { id: { type: "string", short: "i" } },
  async run(ctx, values, positionals) {
    noPositionals(this, positionals);
    const id = requireUuid(values, "id", this);
    const client = await ctx.runningDaemon(NO_SNAPSHOT);
    ctx.print(await ctx.call(client, "snapshot_destroy", { id }), null);
    return EXIT.OK;
  },
};

export const snapshot_collect: Command = {
  name: "snapshot_collect",
  summary: "List the snapshots: one UUID per line.",
  usage: "blksnap snapshot_collect",
  help: `Prints the UUID of every snapshot, one per line, and nothing when there is none
(also when no daemon runs: exit 0). Does not start the daemon.`,
  options: {},
  async run(ctx, _values, positionals) {
    noPositionals(this, positionals);
    let client;
    try {
      client = await ctx.daemon(false);
    } catch (err) {
      if (!(err instanceof NoDaemonError)) throw err;
      ctx.print({ ids: [] }, null);
      return EXIT.OK;
    }
    const r = await ctx.call(client, "snapshot_collect", {});
    ctx.print(r, r.ids.length > 0 ? r.ids.join("\n") : null);
    return EXIT.OK;
  },
};

export const snapshot_info: Command = {
  name: "snapshot_info",
  summary: "Show a device's snapshot image and error code.",
  usage: "blksnap snapshot_info --device DEVICE [--field image|error_code]",
  help: `Options:
  -d, --device DEVICE   the original, its tracked device, or /dev/block/MAJ:MIN
  -f, --field FIELD     print only this field's value: image or error_code

Prints:
  error_code=N     0, or the negative errno that corrupted the snapshot
  image=PATH       the snapshot image (empty until the snapshot is taken)

Does not start the daemon (exit 3 when none runs).`,
  options: { device: { type: "string", short: "d" }, field: { type: "string", short: "f" } },
  async run(ctx, values, positionals) {
    noPositionals(this, positionals);
    const device = resolve(requireString(values, "device", this));
    const field = values.field;
    if (field !== undefined && field !== "image" && field !== "error_code") {
      throw new UsageError(
        `${this.name}: --field must be image or error_code, not "${String(field)}"`,
      );
    }
    const client = await ctx.runningDaemon("no device is tracked");
    const r = await ctx.call(client, "snapshot_info", { device });
    const text = field === "image"
      ? r.image
      : field === "error_code"
      ? String(r.errorCode)
      : `error_code=${r.errorCode}\nimage=${r.image}`;
    ctx.print(r, text);
    return EXIT.OK;
  },
};

/** The tool's snapshot_waitevent lines, plus the event's details. */
export function waitEventText(r: WaitEventResult): string {
  if (r.result !== "ok") return `result=${r.result}`;
  const lines = ["result=ok", `time=${r.time}`];
  switch (r.event) {
    case "corrupted":
      lines.push("event=corrupted", `device=${r.device}`, `error_code=${r.errorCode}`);
      break;
    case "no_space":
      lines.push("event=no_space", `requested_nr_sect=${r.requestedSectors}`);
      break;
    default: {
      const other = r as { code?: unknown };
      lines.push(`event=${other.code}`);
    }
  }
  return lines.join("\n");
}

function isGone(err: unknown): err is DaemonError {
  return err instanceof DaemonError && err.code === "ESRCH";
}

export const snapshot_waitevent: Command = {
  name: "snapshot_waitevent",
  summary: "Wait for one event of a snapshot (corrupted, no_space) and print it.",
  usage: "blksnap snapshot_waitevent --id UUID --timeout MILLISECONDS",
  help: `Options:
${ID_HELP}
  -t, --timeout MS      how long to wait, in milliseconds (0 .. 2147483647)

Prints, on an event:
  result=ok
  time=MS                     when it happened, ms since the epoch
  event=corrupted | no_space
then for corrupted:
  device=MAJ:MIN              the original whose image failed
  error_code=N                the errno, positive as the module sends it
or for no_space:
  requested_nr_sect=N         the size, in sectors, the storage could not grow to
and only "result=timeout" when the time ran out. A snapshot that does not exist
prints "result=not found" and exits 1. Does not start the daemon (exit 3).`,
  options: { id: { type: "string", short: "i" }, timeout: { type: "string", short: "t" } },
  async run(ctx, values, positionals) {
    noPositionals(this, positionals);
    const id = requireUuid(values, "id", this);
    const timeoutMs = parseTimeout(requireString(values, "timeout", this), "timeout");
    const client = await ctx.runningDaemon(NO_SNAPSHOT);
    let r: WaitEventResult;
    try {
      r = await ctx.call(client, "snapshot_waitevent", { id, timeoutMs });
    } catch (err) {
      if (isGone(err) && !ctx.json) console.log("result=not found");
      throw err;
    }
    ctx.print(r, waitEventText(r));
    return EXIT.OK;
  },
};

/** The tool's snapshot_watcher line for an event. */
export function watcherText(r: Extract<WaitEventResult, { result: "ok" }>): string {
  switch (r.event) {
    case "corrupted":
      return `${r.time} - The snapshot was corrupted for device [${r.device}] with error "${
        errnoDescription(Math.abs(r.errorCode))
      }".`;
    case "no_space":
      return `${r.time} - The difference storage already grew up to ${
        Math.floor(r.requestedSectors / 2048)
      } MiB. Limit has been reached.`;
    default: {
      const other = r as { time?: unknown; code?: unknown };
      return `${other.time} - unsupported event #${other.code}.`;
    }
  }
}

/** Poll period of snapshot_watcher, like the tool's. */
export const WATCHER_TIMEOUT_MS = 1000;

export const snapshot_watcher: Command = {
  name: "snapshot_watcher",
  summary: "Print a snapshot's events as they come, until it is corrupted or destroyed.",
  usage: "blksnap snapshot_watcher --id UUID",
  help: `Options:
${ID_HELP}

Prints "Start snapshot watcher.", then one line per event:
  TIME - The snapshot was corrupted for device [MAJ:MIN] with error "TEXT".
  TIME - The difference storage already grew up to N MiB. Limit has been reached.
(TIME in ms since the epoch), and when the snapshot is gone "Snapshot not found";
last "Snapshot watcher finished". With --json, one JSON object per line: each
event, then {"result":"not found","id":UUID} when the snapshot is gone.

Exit status: 0 when the snapshot was destroyed, 1 after it was corrupted,
3 when the daemon goes away. Does not start the daemon.`,
  options: { id: { type: "string", short: "i" } },
  async run(ctx, values, positionals) {
    noPositionals(this, positionals);
    const id = requireUuid(values, "id", this);
    const client = await ctx.runningDaemon(NO_SNAPSHOT);
    return await watch(ctx, client, id);
  },
};

async function watch(
  ctx: Context,
  client: Awaited<ReturnType<Context["daemon"]>>,
  id: string,
): Promise<number> {
  const say = (value: unknown, text: string) => ctx.print(value, text);
  if (!ctx.json) console.log("Start snapshot watcher.");
  for (;;) {
    let r: WaitEventResult;
    try {
      r = await ctx.call(client, "snapshot_waitevent", { id, timeoutMs: WATCHER_TIMEOUT_MS });
    } catch (err) {
      if (!isGone(err)) throw err;
      say({ result: "not found", id }, "Snapshot not found");
      if (!ctx.json) console.log("Snapshot watcher finished");
      return EXIT.OK;
    }
    if (r.result !== "ok") continue;
    say(r, watcherText(r));
    if (r.event === "corrupted") {
      if (!ctx.json) console.log("Snapshot watcher finished");
      return EXIT.FAILED;
    }
  }
}
