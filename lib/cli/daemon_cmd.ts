/**
 * `blksnap daemon`: the ublk server and holder of all state.
 */
import {
  type Command,
  type Context,
  EXIT,
  noPositionals,
  UsageError,
  type Values,
} from "./command.ts";
import { Client, DaemonUnavailableError, startDaemon } from "../daemon/client.ts";
import { runDaemon } from "../daemon/run.ts";
import { DEFAULT_SOCKET_PATH } from "../daemon/protocol.ts";
import { DEFAULT_DAEMON_OPTIONS, pidAlive } from "../daemon/daemon.ts";
import { MAX_QUEUES } from "../pipeline/device_ctl.ts";
import { DEFAULT_PARAMS, PARAM_SPECS, type Params, resolveParams } from "../engine/params.ts";
import { BlksnapError } from "../../ffi/errno.ts";

const PARAM_OPTIONS = Object.fromEntries(
  PARAM_SPECS.map((spec) => [spec.name.replaceAll("_", "-"), { type: "string" as const }]),
);

const PARAM_HELP = PARAM_SPECS.map((p) =>
  `  --${p.name.replaceAll("_", "-")}=${DEFAULT_PARAMS[p.key]}\n      ${p.description}`
).join("\n");

export const daemon: Command = {
  name: "daemon",
  summary: "Run the blksnap daemon (the ublk server) in the foreground.",
  usage:
    "blksnap daemon [--socket PATH] [--log-file FILE] [--queues N] [--queue-depth N] [PARAMETERS]\n" +
    "       blksnap daemon --handover [--force] [--socket PATH] [--json]",
  help: `Options:
  --socket PATH           control socket (default ${DEFAULT_SOCKET_PATH}, mode 0600)
  --log-file FILE         append log lines to FILE instead of stderr
  --queues N              ublk hardware queues per device (default ${DEFAULT_DAEMON_OPTIONS.queues})
  --queue-depth N         tags per queue (default ${DEFAULT_DAEMON_OPTIONS.queueDepth})
  --io-buffer-kib N       per-tag buffer, the largest request (default ${
    DEFAULT_DAEMON_OPTIONS.maxIoBufBytes / 1024
  }, 4..1024)
  --no-private-mounts     stay in the caller's mount namespace (not recommended)
  --handover              tell the running daemon to exit leaving its tracked devices
                          quiesced (I/O waits, nothing fails), then start the next
                          daemon (the installed program: an upgrade), which takes them
                          over with their CBT maps; under systemd the unit restarts it.
                          Refused while snapshots are held (they are not persistent)
  --force                 with --handover: hand over even so; held snapshots are lost

Parameters (the kernel module's, same defaults; cow-stall-timeout-ms is this
program's copy-on-write watchdog):
${PARAM_HELP}

Other commands start the daemon when it is not running. It runs in a private
mount namespace. SIGTERM or SIGINT removes every device it made and exits;
SIGUSR2 is a handover (the daemon exits with status 75, devices left to the
next daemon).
Needs root and the ublk_drv module (Linux 6.0 or later).`,
  options: {
    "log-file": { type: "string" },
    queues: { type: "string" },
    "queue-depth": { type: "string" },
    "io-buffer-kib": { type: "string" },
    "no-private-mounts": { type: "boolean" },
    handover: { type: "boolean" },
    force: { type: "boolean" },
    ...PARAM_OPTIONS,
  },
  async run(ctx, values, positionals) {
    noPositionals(this, positionals);
    if (values.handover === true) return await handover(ctx, values.force === true);
    if (values.force === true) throw new UsageError("daemon: --force goes with --handover");
    const queues = intOption(values, "queues", DEFAULT_DAEMON_OPTIONS.queues, 1, MAX_QUEUES);
    const queueDepth = intOption(values, "queue-depth", DEFAULT_DAEMON_OPTIONS.queueDepth, 1, 4096);
    const ioBufferKib = intOption(
      values,
      "io-buffer-kib",
      DEFAULT_DAEMON_OPTIONS.maxIoBufBytes / 1024,
      4,
      1024,
    );
    if (ioBufferKib % 4 !== 0) {
      throw new UsageError("daemon: --io-buffer-kib must be a multiple of 4");
    }
    const overrides: Partial<Record<keyof Params, number>> = {};
    for (const spec of PARAM_SPECS) {
      const option = spec.name.replaceAll("_", "-");
      if (values[option] !== undefined) {
        overrides[spec.key] = intOption(values, option, 0, spec.minimum, spec.maximum);
      }
    }
    let resolved;
    try {
      resolved = resolveParams(overrides);
    } catch (err) {
      if (err instanceof BlksnapError) throw new UsageError(`daemon: ${err.message}`);
      throw err;
    }
    for (const w of resolved.warnings) console.error(`blksnap: ${w}`);
    const params = resolved.params;
    const logFile = values["log-file"];
    return await runDaemon({
        ...DEFAULT_DAEMON_OPTIONS,
        queues,
        queueDepth,
        maxIoBufBytes: ioBufferKib * 1024,
        socketPath: ctx.socketPath,
        privateMounts: values["no-private-mounts"] !== true,
        params,
        ...(typeof logFile === "string" ? { logFile } : {}),
      }) === 0
      ? EXIT.OK
      : EXIT.FAILED;
  },
};

/**
 * `daemon --handover`: the running daemon exits leaving its devices
 * quiesced; the next one (systemd's restart, or one started here) takes them
 * over. Prints what the next daemon recovered and how long I/O waited.
 */
async function handover(ctx: Context, force: boolean): Promise<number> {
  const client = await ctx.runningDaemon("nothing to hand over");
  const started = performance.now();
  const r = await ctx.call(client, "handover", { force });
  client.close();
  // The old daemon exits once it answered; wait until it is gone.
  for (let i = 0; i < 600 && pidAlive(r.pid); i++) await sleep(50);
  if (pidAlive(r.pid)) {
    throw new DaemonUnavailableError(`The daemon (pid ${r.pid}) did not exit after the handover`);
  }
  // A supervisor (the systemd unit) restarts it at once; else start it here.
  let next: Client | undefined;
  for (let i = 0; i < 40 && next === undefined; i++) {
    next = await Client.connect(ctx.socketPath).catch(() => undefined);
    if (next === undefined) await sleep(50);
  }
  if (next === undefined) {
    const extra = (Deno.env.get("BLKSNAP_DAEMON_ARGS") ?? "").split(/\s+/).filter((s) => s);
    await startDaemon({ socketPath: ctx.socketPath, daemonArgs: extra });
    next = await Client.connect(ctx.socketPath);
  }
  const st = await ctx.call(next, "status", {});
  next.close();
  const ms = Math.round(performance.now() - started);
  const report = st.recovery;
  const recovered = report?.recovered ?? [];
  const unrecovered = report?.unrecovered ?? [];
  ctx.print(
    { from: r.pid, to: st.pid, ms, snapshotsLost: r.snapshotsLost, recovery: report ?? null },
    [
      `handed over ${r.devices} tracked device(s) from pid ${r.pid} to pid ${st.pid} in ${ms} ms`,
      ...recovered.map((d) =>
        `  ${d.tracked} (${d.original}): taken over in ${Math.round(d.recoveryMs)} ms, CBT ${
          d.cbtResetReason === null ? "kept" : `reset: ${d.cbtResetReason}`
        }`
      ),
      ...unrecovered.map((d) =>
        `  ${d.tracked} (${d.original}): NOT taken over: ${d.reason}; ${d.hint}`
      ),
      ...(r.snapshotsLost > 0 ? [`  ${r.snapshotsLost} snapshot(s) lost`] : []),
    ].join("\n"),
  );
  return unrecovered.length > 0 ? EXIT.FAILED : EXIT.OK;
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

function intOption(values: Values, name: string, dflt: number, min: number, max: number): number {
  const raw = values[name];
  if (raw === undefined) return dflt;
  if (typeof raw !== "string" || !/^\d+$/.test(raw)) {
    throw new UsageError(`daemon: --${name} must be a whole number, not "${raw}"`);
  }
  const n = Number(raw);
  if (n < min || n > max) {
    throw new UsageError(`daemon: --${name} must be between ${min} and ${max}`);
  }
  return n;
}
