/**
 * Tracking devices: attach, detach, status.
 */
import { resolve } from "node:path";
import { type Command, EXIT, noPositionals, requireString } from "./command.ts";
import { NoDaemonError } from "../daemon/client.ts";
import { errnoDescription } from "../../ffi/errno.ts";
import type {
  DeviceStatus,
  QueueStats,
  RecoveryReport,
  SnapshotStatus,
  StatusResult,
  TrackedInfo,
} from "../daemon/protocol.ts";

export const attach: Command = {
  name: "attach",
  summary: "Start tracking a block device: create its tracked device and print its path.",
  usage: "blksnap attach --device DEVICE",
  help: `Options:
  -d, --device DEVICE   the original block device (e.g. /dev/sdb1, /dev/block/8:17)

The original is opened exclusively: it must not be mounted. Make filesystems on,
and mount, the tracked device that this prints (e.g. /dev/ublkb0), never the
original. A read-only original (losetup -r, blockdev --setro) gets a read-only
tracked device. Starts the daemon when it is not running.

Example:
  blksnap attach --device /dev/sdb1      # prints /dev/ublkb0
  mount /dev/ublkb0 /srv/data`,
  options: { device: { type: "string", short: "d" } },
  async run(ctx, values, positionals) {
    noPositionals(this, positionals);
    // The daemon's working directory is not the caller's.
    const device = resolve(requireString(values, "device", this));
    const client = await ctx.daemon();
    const info: TrackedInfo = await ctx.call(client, "attach", { device });
    ctx.print(info, info.tracked);
    return EXIT.OK;
  },
};

export const detach: Command = {
  name: "detach",
  summary: "Stop tracking a device and remove its tracked device.",
  usage: "blksnap detach --device DEVICE [--force]",
  help: `Options:
  -d, --device DEVICE   the original, its tracked device, or /dev/block/MAJ:MIN of either
  --force               also delete a tracked device that a daemon which died left
                        and that could not be recovered ("blksnap status" lists
                        them): I/O waiting on it fails

Refused while the tracked device is mounted or open exclusively: unmount first.
The data stays on the original, which can then be mounted directly.`,
  options: { device: { type: "string", short: "d" }, force: { type: "boolean" } },
  async run(ctx, values, positionals) {
    noPositionals(this, positionals);
    const device = resolve(requireString(values, "device", this));
    const client = await ctx.daemon(false);
    if (values.force === true) {
      const r = await ctx.call(client, "detach_force", { device });
      ctx.print(r, `${r.device} detached (${r.tracked} removed)`);
      return EXIT.OK;
    }
    const info: TrackedInfo = await ctx.call(client, "detach", { device });
    ctx.print(info, `${info.original} detached (${info.tracked} removed)`);
    return EXIT.OK;
  },
};

export const recover: Command = {
  name: "recover",
  summary:
    "Take over the tracked devices a daemon that died left (again, for those not recovered).",
  usage: "blksnap recover",
  help: `A daemon that starts takes over by itself every tracked device the daemon
before it left quiesced (any command starts one). This tries again for those it
could not recover (after fixing the cause that "blksnap status" shows), and
prints what was recovered and what was not. Exit status 1 while any is left.`,
  options: {},
  async run(ctx, _values, positionals) {
    noPositionals(this, positionals);
    const client = await ctx.daemon();
    const r = await ctx.call(client, "recover", {});
    const lines = recoveryLines(r);
    ctx.print(r, lines.length > 0 ? lines.join("\n") : "nothing to recover");
    return r.unrecovered.length === 0 ? EXIT.OK : EXIT.FAILED;
  },
};

export const status: Command = {
  name: "status",
  summary: "Show the daemon and every tracked device.",
  usage: "blksnap status",
  help: `Prints the daemon's pid and the ublk features of the kernel, then one line per
tracked device: original, tracked device, size, queues x depth, mode (rw, or ro
for a read-only original, whose tracked device is read-only too), block sizes,
user recovery, bytes read and written, I/O errors, and the change tracker
(CBT: the first 8 digits of the generation id / the change number). Then each
snapshot: its UUID, taken (when) or not, its error code, its difference storage
(path, kind, used / capacity / limit) and its devices with their images.
Does not start the daemon: when none runs it says so and exits 0.`,
  options: {},
  async run(ctx, _values, positionals) {
    noPositionals(this, positionals);
    let client;
    try {
      client = await ctx.daemon(false);
    } catch (err) {
      if (!(err instanceof NoDaemonError)) throw err;
      ctx.print({ running: false, devices: [] }, "daemon: not running\nno tracked devices");
      return EXIT.OK;
    }
    const s: StatusResult = await ctx.call(client, "status", {});
    const lines = [
      `daemon: running, pid ${s.pid}, since ${s.startedAt}, version ${s.version}`,
      `socket: ${s.socket}`,
      `ublk features: ${s.ublkFeatures.join(" ") || "(unknown)"}`,
    ];
    if (s.devices.length === 0) lines.push("no tracked devices");
    else {
      const rows = [[
        "ORIGINAL",
        "TRACKED",
        "SIZE",
        "QUEUES",
        "MODE",
        "BLOCK",
        "RECOVERY",
        "READ",
        "WRITTEN",
        "ERRORS",
        "CBT",
      ]];
      for (const d of s.devices) {
        const total = (k: keyof QueueStats) => d.queueStats.reduce((a, q) => a + q[k], 0);
        rows.push([
          `${d.original} (${d.originalDevice})`,
          `${d.tracked} (${d.trackedDevice})`,
          formatBytes(d.sizeBytes),
          `${d.queues}x${d.queueDepth}`,
          d.readOnly ? "ro" : "rw",
          `${d.logicalBlockSize}/${d.physicalBlockSize}`,
          d.userRecovery ? "yes" : "no",
          formatBytes(total("bytesRead")),
          formatBytes(total("bytesWritten")),
          String(total("errors")),
          cbtColumn(d),
        ]);
      }
      lines.push(...table(rows));
    }
    if (s.snapshots !== undefined) lines.push(...snapshotLines(s.snapshots));
    if (s.recovery !== undefined) lines.push(...recoveryLines(s.recovery));
    for (const f of s.foreignDevices) {
      lines.push(
        `warning: /dev/ublkb${f.ublkId} is not this daemon's: ${f.state}, server pid ${f.pid}` +
          (f.pidAlive ? "" : " (gone)"),
      );
    }
    ctx.print({ running: true, ...s }, lines.join("\n"));
    return EXIT.OK;
  },
};

/** What the daemon took over at its start from one that died, and what it could not. */
export function recoveryLines(r: RecoveryReport): string[] {
  const lines: string[] = [];
  if (r.stateFileError) lines.push(`warning: ${r.stateFileError}`);
  const from = `from the daemon that died (pid ${r.previousPid})`;
  for (const d of r.recovered) {
    const cbt = d.cbtResetReason === null
      ? `its CBT map was kept (generation ${d.generationId.slice(0, 8)})`
      : `its CBT map was reset, ${d.cbtResetReason} (generation ${
        d.previousGenerationId.slice(0, 8)
      } -> ${d.generationId.slice(0, 8)}): the next backup is a full one`;
    lines.push(`recovered ${d.tracked} over ${d.original} ${from} in ${d.recoveryMs} ms; ${cbt}`);
  }
  for (const d of r.unrecovered) {
    lines.push(`NOT recovered: ${d.tracked} over ${d.original}: ${d.reason}; ${d.hint}`);
  }
  for (const d of r.removed) lines.push(`removed /dev/ublkb${d.ublkId} (${d.role}): ${d.reason}`);
  for (const sn of r.lostSnapshots) {
    lines.push(`snapshot ${sn.id} (${sn.devices.join(", ")}): corrupted: ${sn.reason}`);
  }
  return lines;
}

/** "1a2b3c4d/3": the generation id's first 8 digits and the change number; "-" without CBT. */
function cbtColumn(d: DeviceStatus): string {
  return d.cbt ? `${d.cbt.generationId.slice(0, 8)}/${d.cbt.changesNumber}` : "-";
}

export function snapshotLines(snapshots: SnapshotStatus[]): string[] {
  if (snapshots.length === 0) return ["no snapshots"];
  const lines: string[] = [];
  for (const sn of snapshots) {
    const state = sn.taken ? `taken ${sn.takenAt ?? ""}`.trimEnd() : "created, not taken";
    const error = sn.errorCode === 0
      ? "error_code=0"
      : `error_code=${sn.errorCode} (corrupted: ${errnoDescription(Math.abs(sn.errorCode))})`;
    const st = sn.storage;
    lines.push(
      `snapshot ${sn.id}: ${state}, ${error}`,
      `  storage: ${st.path} (${st.kind}${st.io === "direct" ? ", direct I/O" : ""}), used ${
        formatBytes(st.filledBytes)
      } of ` +
        `${formatBytes(st.capacityBytes)}, limit ${formatBytes(st.limitBytes)}`,
    );
    if (sn.devices.length === 0) lines.push("  no devices");
    for (const d of sn.devices) {
      lines.push(`  ${d.original} (${d.tracked}) -> ${d.image ?? "(no image until taken)"}`);
    }
  }
  return lines;
}

export function formatBytes(n: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let v = n;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return u === 0 ? `${n} B` : `${v.toFixed(v < 10 ? 2 : 1)} ${units[u]}`;
}

function table(rows: string[][]): string[] {
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
  return rows.map((r) => r.map((c, i) => c.padEnd(widths[i]!)).join("  ").trimEnd());
}
