/**
 * Tracking devices: attach, detach, status.
 */
import { resolve } from "node:path";
import { type Command, EXIT, noPositionals, requireString } from "./command.ts";
import { NoDaemonError } from "../daemon/client.ts";
import type { TrackedInfo } from "../daemon/daemon.ts";
import type { QueueStats } from "../ublk/device.ts";

export const attach: Command = {
  name: "attach",
  summary: "Start tracking a block device: create its tracked device and print its path.",
  usage: "blksnap attach --device DEVICE",
  help: `Options:
  -d, --device DEVICE   the original block device (e.g. /dev/sdb1, /dev/block/8:17)

The original is opened exclusively: it must not be mounted. Make filesystems on,
and mount, the tracked device that this prints (e.g. /dev/ublkb0), never the
original. Starts the daemon when it is not running.

Example:
  blksnap attach --device /dev/sdb1      # prints /dev/ublkb0
  mount /dev/ublkb0 /srv/data`,
  options: { device: { type: "string", short: "d" } },
  async run(ctx, values, positionals) {
    noPositionals(this, positionals);
    // The daemon's working directory is not the caller's.
    const device = resolve(requireString(values, "device", this));
    const client = await ctx.daemon();
    const info = await client.request("attach", { device }) as TrackedInfo;
    ctx.print(info, info.tracked);
    return EXIT.OK;
  },
};

export const detach: Command = {
  name: "detach",
  summary: "Stop tracking a device and remove its tracked device.",
  usage: "blksnap detach --device DEVICE",
  help: `Options:
  -d, --device DEVICE   the original, its tracked device, or /dev/block/MAJ:MIN of either

Refused while the tracked device is mounted or open exclusively: unmount first.
The data stays on the original, which can then be mounted directly.`,
  options: { device: { type: "string", short: "d" } },
  async run(ctx, values, positionals) {
    noPositionals(this, positionals);
    const device = resolve(requireString(values, "device", this));
    const client = await ctx.daemon(false);
    const info = await client.request("detach", { device }) as TrackedInfo;
    ctx.print(info, `${info.original} detached (${info.tracked} removed)`);
    return EXIT.OK;
  },
};

interface StatusResult {
  version: string;
  pid: number;
  startedAt: string;
  socket: string;
  ublkFeatures: string[];
  devices: Array<TrackedInfo & { queueStats: QueueStats[] }>;
  foreignDevices: Array<{ ublkId: number; state: string; pid: number; pidAlive: boolean }>;
}

export const status: Command = {
  name: "status",
  summary: "Show the daemon and every tracked device.",
  usage: "blksnap status",
  help: `Prints the daemon's pid and the ublk features of the kernel, then one line per
tracked device: original, tracked device, size, queues x depth. Does not start
the daemon: when none runs it says so and exits 0.`,
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
    const s = await client.request("status", {}) as StatusResult;
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
        "BLOCK",
        "RECOVERY",
        "READ",
        "WRITTEN",
        "ERRORS",
      ]];
      for (const d of s.devices) {
        const total = (k: keyof QueueStats) => d.queueStats.reduce((a, q) => a + q[k], 0);
        rows.push([
          `${d.original} (${d.originalDevice})`,
          `${d.tracked} (${d.trackedDevice})`,
          formatBytes(d.sizeBytes),
          `${d.queues}x${d.queueDepth}`,
          `${d.logicalBlockSize}/${d.physicalBlockSize}`,
          d.userRecovery ? "yes" : "no",
          formatBytes(total("bytesRead")),
          formatBytes(total("bytesWritten")),
          String(total("errors")),
        ]);
      }
      lines.push(...table(rows));
    }
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
