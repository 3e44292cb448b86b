/**
 * Backups: backup (a snapshot of tracked devices copied into a point: full
 * the first time, only the changed blocks after), restore, verify, backups.
 * The file formats and their rules are in lib/backup/.
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
  type Values,
} from "./command.ts";
import { parseSize, stringList } from "./parse.ts";
import { decodeBase64 } from "./cbt.ts";
import { type Client, DaemonError } from "../daemon/client.ts";
import { BlksnapError } from "../../ffi/errno.ts";
import {
  cleanLeftovers,
  listPoints,
  LOCK_FILE,
  type Manifest,
  parsePointPath,
  readManifest,
  SNAPSHOT_FILE,
  writeFileAtomic,
} from "../backup/manifest.ts";
import { CopyPool, type DeviceSource, writePoint } from "../backup/point.ts";
import {
  deviceChain,
  pickDevice,
  prune,
  type PruneResult,
  restorePoint,
  verifyPoint,
} from "../backup/chain.ts";
import { openTarget } from "../backup/target.ts";
import { devTKey } from "../dev_t.ts";

/** Exit statuses of backup beyond the common ones (0, 1, 2, 3). */
export const BACKUP_EXIT = {
  /** Nothing changed since the last point: no point was written. */
  NOTHING_TO_DO: 4,
  /** The snapshot overflowed its difference storage: no point was written. */
  OVERFLOW: 5,
  /** Another backup or prune holds the directory's lock. */
  LOCKED: 6,
} as const;

const DEFAULT_LIMIT = "1G";

/** Library errors (BlksnapError) as the CLI's CommandError: a message and exit 1. */
async function cliErrors<T>(fn: () => Promise<T> | T): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    if (err instanceof BlksnapError) throw new CommandError(err.code, err.message);
    // An I/O error of Deno (a full filesystem, a failing disk): its errno name and message.
    const code = (err as { code?: unknown }).code;
    if (
      err instanceof Error && !(err instanceof CommandError) &&
      (Object.values(Deno.errors).some((c) => err instanceof c) ||
        (typeof code === "string" && /^E[A-Z0-9]+$/.test(code)))
    ) {
      throw new CommandError(typeof code === "string" ? code : "EIO", err.message);
    }
    throw err;
  }
}

function mib(bytes: number): string {
  return bytes >= 1024 ** 3
    ? `${(bytes / 1024 ** 3).toFixed(1)} GiB`
    : `${(bytes / 1024 ** 2).toFixed(1)} MiB`;
}

/** A progress line on stdout when it is a terminal: percent, rate, time left. */
function progressBar(enabled: boolean): ((done: number, total: number) => void) & { end(): void } {
  const start = Date.now();
  let last = 0;
  let shown = false;
  const f = (done: number, total: number) => {
    if (!enabled) return;
    const now = Date.now();
    if (now - last < 200 && done < total) return;
    last = now;
    const secs = Math.max(0.001, (now - start) / 1000);
    const rate = done / secs;
    const left = rate > 0 ? (total - done) / rate : 0;
    const pct = total > 0 ? Math.floor((done * 100) / total) : 100;
    const bar = "#".repeat(Math.floor(pct / 5)).padEnd(20, ".");
    const line = `[${bar}] ${String(pct).padStart(3)}% ${mib(done)} of ${mib(total)}, ` +
      `${mib(rate)}/s, ${Math.ceil(left)} s left`;
    Deno.stdout.writeSync(new TextEncoder().encode(`\r${line}\x1b[K`));
    shown = true;
  };
  return Object.assign(f, {
    end() {
      if (shown) Deno.stdout.writeSync(new TextEncoder().encode("\n"));
    },
  });
}

function isTerminal(): boolean {
  try {
    return Deno.stdout.isTerminal();
  } catch {
    return false;
  }
}

function requireDir(path: string, option: string): string {
  const dir = resolve(path);
  let info: Deno.FileInfo;
  try {
    info = Deno.statSync(dir);
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) {
      throw new CommandError("ENOENT", `--${option} ${dir} does not exist (make it first)`);
    }
    throw new CommandError("EIO", `Cannot stat ${dir}: ${(err as Error).message}`);
  }
  if (!info.isDirectory) throw new CommandError("ENOTDIR", `--${option} ${dir} is not a directory`);
  return dir;
}

/** A point given as DIR/ID.json or DIR/ID. */
function pointArg(values: Values, cmd: Command): { dir: string; id: string } {
  const text = requireString(values, "from", cmd);
  try {
    const { dir, id } = parsePointPath(resolve(text));
    return { dir, id };
  } catch (err) {
    throw new UsageError(`${cmd.name}: ${(err as Error).message}`);
  }
}

// ---------------------------------------------------------------------------

export const backup: Command = {
  name: "backup",
  summary: "Back up tracked devices into a directory: full the first time, changed blocks after.",
  usage: "blksnap backup --device DEVICE... --to DIR [--diff-storage PATH] [--limit SIZE] " +
    "[--keep N] [--compress] [--full] [--verbose]",
  help: `Options:
  -d, --device DEVICE     a tracked device: the original, its tracked device, or
                          /dev/block/MAJ:MIN; repeatable, and one -d takes several.
                          The devices must be tracked already (blksnap attach,
                          before the filesystem is mounted): backup attaches none.
  --to DIR                the backup directory (must exist; not on a device being
                          backed up). Each run adds a point: ID.json, the manifest,
                          and ID.KEY.qcow2 per device (qemu-img opens them).
  -f, --diff-storage PATH the snapshot's difference storage: a file, directory or
                          block device, not on a device being backed up
                          (default: DIR)
  -l, --limit SIZE        the most the difference storage may grow to while the
                          copy runs (default ${DEFAULT_LIMIT}; K, M, G, T suffixes)
  --keep N                then keep only the newest N points (the oldest kept
                          point absorbs what it needs of the removed ones)
  --compress              store clusters deflate-compressed (qemu-img reads them)
  --full                  a full backup even when an incremental is possible
  -v, --verbose           say what was done (quiet otherwise, unless wrong)

The first point of a device in DIR is full; so is one after the change
tracker's generation changed (reset, or wrapped past 255 snapshots) and the
manifest says why. Otherwise only the tracking blocks whose change number is
newer than the last point's are read from the snapshot image, and the point's
qcow2 files have the previous point's as backing files. Clusters of zeroes are
not stored. The snapshot is destroyed at the end, also on failure; it is tied
to this run's connection to the daemon, which destroys it when a killed run's
connection closes. A progress bar shows when stdout is a terminal.

Exit status:
  0  a point was written
  1  failure (the message says why); no point was written
  2  bad command line
  3  no daemon runs (so nothing is tracked)
  4  nothing changed since the last point: no point was written
  5  the snapshot overflowed its difference storage: no point was written;
     run again with a larger --limit
  6  another backup or prune of DIR is running`,
  options: {
    device: { type: "string", short: "d", multiple: true },
    to: { type: "string" },
    "diff-storage": { type: "string", short: "f" },
    limit: { type: "string", short: "l" },
    keep: { type: "string" },
    compress: { type: "boolean" },
    full: { type: "boolean" },
    verbose: { type: "boolean", short: "v" },
  },
  multitoken: ["device"],
  async run(ctx, values, positionals) {
    noPositionals(this, positionals);
    const devices = stringList(values, "device").map((d) => {
      if (d === "") throw new UsageError(`${this.name}: --device must not be empty`);
      return resolve(d);
    });
    if (devices.length === 0) throw new UsageError(`${this.name}: --device is required`);
    const dir = requireDir(requireString(values, "to", this), "to");
    const limitBytes = parseSize(
      typeof values.limit === "string" ? values.limit : DEFAULT_LIMIT,
      "limit",
    );
    if (limitBytes < 1024 * 1024) throw new UsageError(`${this.name}: --limit must be at least 1M`);
    const keep = values.keep === undefined ? undefined : Number(values.keep);
    if (keep !== undefined && (!Number.isSafeInteger(keep) || keep < 1)) {
      throw new UsageError(`${this.name}: --keep must be a whole number of at least 1`);
    }
    const storage = typeof values["diff-storage"] === "string"
      ? resolve(values["diff-storage"])
      : dir;
    const verbose = values.verbose === true;
    const say = (text: string) => {
      if (verbose && !ctx.json) console.log(text);
    };

    // Before anything is written to DIR: the devices are tracked, DIR and the storage not on them.
    const client = await ctx.runningDaemon(
      `no device is tracked (attach each device first: blksnap attach --device DEVICE)`,
    );
    const tracked = await trackedDevices(ctx, client, devices);
    checkNotOn(dir, "The backup directory", tracked);
    checkNotOn(storage, "The difference storage", tracked);

    // One run at a time per directory.
    let lock: Deno.FsFile;
    try {
      lock = Deno.openSync(`${dir}/${LOCK_FILE}`, { read: true, write: true, create: true });
    } catch (err) {
      throw new CommandError(
        "EACCES",
        `Cannot open ${dir}/${LOCK_FILE}: ${(err as Error).message}`,
      );
    }
    try {
      if (!lock.tryLockSync(true)) {
        const msg = `Another backup or prune of ${dir} is running (${dir}/${LOCK_FILE} is locked)`;
        if (ctx.json) console.log(JSON.stringify({ error: { code: "EWOULDBLOCK", message: msg } }));
        console.error(`blksnap: ${msg}`);
        return BACKUP_EXIT.LOCKED;
      }
      return await runBackup(ctx, {
        client,
        tracked,
        dir,
        storage,
        limitBytes,
        keep,
        compress: values.compress === true,
        full: values.full === true,
        verbose,
        say,
      });
    } finally {
      lock.close(); // releases the lock
    }
  },
};

interface BackupArgs {
  client: Client;
  tracked: TrackedDevice[];
  dir: string;
  storage: string;
  limitBytes: number;
  keep: number | undefined;
  compress: boolean;
  full: boolean;
  verbose: boolean;
  say: (text: string) => void;
}

interface TrackedDevice {
  original: string;
  tracked: string;
}

/** The daemon's names of `devices`; an untracked one is an error that says how to attach it. */
async function trackedDevices(
  ctx: Context,
  client: Client,
  devices: string[],
): Promise<TrackedDevice[]> {
  const tracked: TrackedDevice[] = [];
  for (const d of devices) {
    try {
      const info = await ctx.call(client, "cbtinfo", { device: d });
      if (tracked.some((t) => t.original === info.device)) {
        throw new UsageError(`backup: ${d} is given twice`);
      }
      tracked.push({ original: info.device, tracked: info.tracked });
    } catch (err) {
      if (err instanceof DaemonError && err.code === "ENOENT") {
        throw new CommandError(
          "ENOENT",
          `${d} is not tracked: attach it before its filesystem is mounted ` +
            `("blksnap attach --device ${d}", then mount the tracked device it prints)`,
        );
      }
      throw err;
    }
  }
  return tracked;
}

class Overflow extends Error {}

async function runBackup(ctx: Context, a: BackupArgs): Promise<number> {
  const { dir, say, client, tracked } = a;

  // What a killed run left: its snapshot, its temporary files.
  const leftover = readLeftoverSnapshot(dir);
  if (leftover !== null) {
    try {
      await ctx.call(client, "snapshot_destroy", { id: leftover });
      console.error(`blksnap: destroyed snapshot ${leftover}, left by an interrupted backup`);
    } catch (err) {
      if (!(err instanceof DaemonError && err.code === "ESRCH")) throw err;
    }
    Deno.removeSync(`${dir}/${SNAPSHOT_FILE}`);
  }
  const cleaned = await cliErrors(() => cleanLeftovers(dir));
  if (cleaned.length > 0) say(`removed ${cleaned.length} file(s) of an interrupted run`);

  // A full copy's workers start now, while the snapshot is made (seconds under TCG); an
  // incremental starts them in writePoint only when it copies enough to need them.
  const pool = a.full || listPoints(dir).length === 0 ? new CopyPool() : undefined;
  let snapshotId: string;
  try {
    ({ id: snapshotId } = await ctx.call(client, "snapshot_create", {
      devices: tracked.map((t) => t.original),
      storage: a.storage,
      limitBytes: a.limitBytes,
      clientPid: Deno.pid,
      // Tied to this connection: however this run ends (killed before .snapshot
      // is written, too), the daemon destroys the snapshot when it closes.
      session: true,
    }));
  } catch (err) {
    pool?.close();
    throw err;
  }
  await injectedPause("BLKSNAP_FAULT_BACKUP_AFTER_CREATE_MS");
  const abort = new AbortController();
  const onSignal = () =>
    abort.abort(new CommandError("EINTR", "Interrupted: no point was written"));
  const signals: Deno.Signal[] = ["SIGINT", "SIGTERM", "SIGHUP"];
  for (const s of signals) Deno.addSignalListener(s, onSignal);
  let manifest: Manifest | null = null;
  let overflow = false;
  let copySeconds = 0;
  const bar = progressBar(isTerminal() && !ctx.json);
  try {
    writeFileAtomic(dir, SNAPSHOT_FILE, new TextEncoder().encode(snapshotId + "\n"));
    const taken = await ctx.call(client, "snapshot_take", { id: snapshotId });
    const sources: DeviceSource[] = [];
    for (const t of tracked) {
      const image = taken.images.find((i) => i.original === t.original);
      if (image === undefined) {
        throw new CommandError("EPROTO", `The daemon gave no snapshot image for ${t.original}`);
      }
      let cbt: DeviceSource["cbt"] = null;
      try {
        const r = await ctx.call(client, "readcbtmap", { device: t.original });
        let map: Uint8Array | null = decodeBase64(r.map);
        if (map.length !== r.blockCount) map = null;
        cbt = {
          generationId: r.generationId,
          changesNumber: r.changesNumber,
          blockBytes: r.blockSize,
          map,
        };
      } catch (err) {
        if (!(err instanceof DaemonError)) throw err;
        say(`${t.original}: no change map (${err.message}): a full backup`);
      }
      sources.push({ original: t.original, source: image.image, cbt });
    }
    const overflowed = async () => {
      for (const t of tracked) {
        const info = await ctx.call(client, "snapshot_info", { device: t.original });
        if (info.errorCode !== 0) return true;
      }
      return false;
    };
    const t0 = performance.now();
    try {
      manifest = await cliErrors(() =>
        writePoint(dir, {
          devices: sources,
          snapshotId,
          time: new Date(),
          compress: a.compress,
          ...(a.full ? { forceFull: "asked for (--full)" } : {}),
          skipUnchanged: true,
          ...(pool !== undefined ? { pool } : {}),
          signal: abort.signal,
          onProgress: bar,
          beforeCommit: async () => {
            if (await overflowed()) throw new Overflow();
          },
        })
      );
    } catch (err) {
      // A read error of an image whose snapshot overflowed is the overflow.
      if (err instanceof Overflow || (await overflowed().catch(() => false))) overflow = true;
      else throw err;
    }
    copySeconds = (performance.now() - t0) / 1000;
  } finally {
    pool?.close();
    bar.end();
    for (const s of signals) Deno.removeSignalListener(s, onSignal);
    try {
      await ctx.call(client, "snapshot_destroy", { id: snapshotId });
      Deno.removeSync(`${dir}/${SNAPSHOT_FILE}`);
    } catch (err) {
      console.error(`blksnap: could not destroy snapshot ${snapshotId}: ${(err as Error).message}`);
    }
  }
  if (overflow) {
    const msg = `The snapshot overflowed its difference storage (limit ${
      mib(a.limitBytes)
    }) while the devices were copied: no point was written. Run again with a larger --limit.`;
    if (ctx.json) console.log(JSON.stringify({ error: { code: "ENOSPC", message: msg } }));
    console.error(`blksnap: ${msg}`);
    return BACKUP_EXIT.OVERFLOW;
  }
  let pruned: PruneResult | undefined;
  if (a.keep !== undefined) {
    pruned = await cliErrors(() => prune(dir, a.keep!));
    if (pruned.removed.length > 0) {
      say(`pruned ${pruned.removed.join(", ")}; ${pruned.absorbed.join(", ") || "none"} absorbed`);
    }
  }
  if (manifest === null) {
    const last = listPoints(dir).at(-1)?.id;
    const msg = `Nothing changed since point ${last}: no point was written`;
    ctx.print({ point: null, nothingToDo: true, previous: last, pruned }, a.verbose ? msg : null);
    return BACKUP_EXIT.NOTHING_TO_DO;
  }
  const m = manifest;
  for (const d of m.devices) {
    say(
      `${d.original}: ${d.kind}${d.kind === "full" ? ` (${d.reason})` : ""}, read ${
        mib(d.bytesRead)
      }, stored ${mib(d.bytesStored)} in ${d.file}`,
    );
  }
  say(`point ${m.id} written to ${dir}`);
  if (ctx.json) {
    console.log(JSON.stringify({
      point: m.id,
      dir,
      kind: m.kind,
      reason: m.reason,
      previous: m.previous,
      snapshotId: m.snapshotId,
      bytesRead: m.devices.reduce((n, d) => n + d.bytesRead, 0),
      copySeconds: Math.round(copySeconds * 1000) / 1000,
      devices: m.devices.map(({ extents, ...rest }) => ({ ...rest, extents: extents.length })),
      pruned,
    }));
  }
  return EXIT.OK;
}

/**
 * Fault injection for the VM tests: the run waits this long right after
 * snapshot_create, before it records the snapshot in DIR/.snapshot, so that
 * a test can kill it in that window (unset or 0: no wait).
 */
async function injectedPause(name: string): Promise<void> {
  const ms = Number(Deno.env.get(name) ?? "0");
  if (Number.isSafeInteger(ms) && ms > 0) await new Promise((r) => setTimeout(r, ms));
}

function readLeftoverSnapshot(dir: string): string | null {
  try {
    const id = Deno.readTextFileSync(`${dir}/${SNAPSHOT_FILE}`).trim();
    return /^[0-9a-f-]{36}$/i.test(id) ? id : null;
  } catch {
    return null;
  }
}

/** `path` (or its directory, when it does not exist) must not be on a tracked device of the backup. */
function checkNotOn(
  path: string,
  what: string,
  devices: { original: string; tracked: string }[],
): void {
  let info: Deno.FileInfo;
  try {
    info = Deno.statSync(path);
  } catch {
    return; // the daemon reports a storage that does not exist
  }
  if (info.isBlockDevice) return; // the daemon checks a storage device
  const key = devTKey(info.dev);
  for (const d of devices) {
    for (const p of [d.original, d.tracked]) {
      let rdev: number | null = null;
      try {
        rdev = Deno.statSync(p).rdev;
      } catch {
        continue;
      }
      if (rdev !== null && devTKey(rdev) === key) {
        throw new CommandError(
          "EINVAL",
          `${what} ${path} is on ${d.tracked}, a device being backed up: use another filesystem`,
        );
      }
    }
  }
}

// ---------------------------------------------------------------------------

export const restore: Command = {
  name: "restore",
  summary: "Write the device content of a backup point (following its chain) to a device or file.",
  usage: "blksnap restore --from POINT --to DEVICE_OR_FILE [--device KEY] [--no-verify]",
  help: `Options:
  --from POINT        the point: DIR/ID.json (or DIR/ID)
  --to TARGET         a block device, an existing file (written like a device),
                      or a new file (made sparse, named when complete)
  -d, --device KEY    which device of the point (its key, e.g. loop0, or its
                      original path); needed when the point holds several
  --no-verify         skip checking the chain's checksums first

The chain is verified first: a damaged point is refused and nothing is
written. A target smaller than the device is refused; so is a block device
that is mounted or held by someone else (a tracked original, which the daemon
holds, a member of an LVM or md device). Prints nothing; --json prints a
summary. Needs no daemon.`,
  options: {
    from: { type: "string" },
    to: { type: "string" },
    device: { type: "string", short: "d" },
    "no-verify": { type: "boolean" },
  },
  async run(ctx, values, positionals) {
    noPositionals(this, positionals);
    const { dir, id } = pointArg(values, this);
    const to = resolve(requireString(values, "to", this));
    const key = typeof values.device === "string" ? values.device : undefined;
    const result = await cliErrors(async () => {
      const device = pickDevice(readManifest(dir, id), key);
      const target = openTarget(to, device.sizeBytes);
      try {
        return await restorePoint(dir, id, device.key, target, {
          verify: values["no-verify"] !== true,
        });
      } finally {
        target.close();
      }
    });
    ctx.print(result, null);
    return EXIT.OK;
  },
};

export const verify: Command = {
  name: "verify",
  summary: "Check every checksum of a backup point and of the points it builds on.",
  usage: "blksnap verify --from POINT",
  help: `Options:
  --from POINT        the point: DIR/ID.json (or DIR/ID)

Reads every stored cluster of the point's chain and compares each extent's
sha256 with the manifests; a missing file or manifest in the chain is an
error too. Prints "ok: ..." on success; otherwise names the first bad extent
(point, device, offset, length) and exits 1. Needs no daemon.`,
  options: { from: { type: "string" } },
  async run(ctx, values, positionals) {
    noPositionals(this, positionals);
    const { dir, id } = pointArg(values, this);
    const r = await cliErrors(() => verifyPoint(dir, id));
    if (!r.ok) {
      const p = r.problem!;
      if (ctx.json) console.log(JSON.stringify(r));
      const at = p.offset !== undefined
        ? ` (point ${p.point}, device ${p.device}, offset ` +
          `${p.offset}, length ${p.length})`
        : "";
      console.error(`blksnap: verify failed: ${p.message}${at}`);
      return EXIT.FAILED;
    }
    ctx.print(
      r,
      `ok: ${r.points.length} point(s) (${r.points.join(", ")}), ${r.extents} extents, ${
        mib(r.bytes)
      } checked`,
    );
    return EXIT.OK;
  },
};

export const backups: Command = {
  name: "backups",
  summary: "List the backup points of a directory: time, kind, size, chain.",
  usage: "blksnap backups --in DIR",
  help: `Options:
  --in DIR            the backup directory

One line per point, oldest first: ID, time, kind (full or incr), the size of
its files, its devices, and the chain of points it needs (back to a full one),
or what is wrong with it. Needs no daemon.`,
  options: { in: { type: "string" } },
  async run(ctx, values, positionals) {
    noPositionals(this, positionals);
    const dir = requireDir(requireString(values, "in", this), "in");
    const listed = await cliErrors(() => listPoints(dir));
    const rows = listed.map((l) => {
      if ("error" in l) return { id: l.id, error: l.error };
      const m = l.manifest;
      const chain = new Set<string>();
      let problem: string | undefined;
      for (const d of m.devices) {
        try {
          for (const link of deviceChain(dir, m, d.key)) chain.add(link.manifest.id);
        } catch (err) {
          problem ??= (err as Error).message;
        }
      }
      return {
        id: m.id,
        time: m.time,
        kind: m.kind,
        reason: m.reason,
        fileBytes: m.devices.reduce((n, d) => n + d.fileBytes, 0),
        sizeBytes: m.devices.reduce((n, d) => n + d.sizeBytes, 0),
        devices: m.devices.map((d) => ({ key: d.key, original: d.original, file: d.file })),
        chain: [...chain],
        ...(problem !== undefined ? { error: problem } : {}),
      };
    });
    const text = rows.length === 0 ? `no backup points in ${dir}` : [
      "ID                   TIME                 KIND  FILES      DEVICES  CHAIN",
      ...rows.map((r) =>
        "time" in r
          ? `${r.id.padEnd(20)} ${r.time.slice(0, 19).replace("T", " ")}  ${
            r.kind === "full" ? "full" : "incr"
          }  ${mib(r.fileBytes).padStart(9)}  ${r.devices.map((d) => d.key).join(",").padEnd(7)}  ${
            r.error !== undefined ? `BROKEN: ${r.error}` : r.chain.join(" <- ")
          }`
          : `${r.id.padEnd(20)} UNREADABLE: ${r.error}`
      ),
    ].join("\n");
    ctx.print({ dir, points: rows }, text);
    return EXIT.OK;
  },
};
