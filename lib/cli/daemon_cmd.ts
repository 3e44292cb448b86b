/**
 * `blksnap daemon`: the ublk server and holder of all state.
 */
import { type Command, EXIT, noPositionals, UsageError, type Values } from "./command.ts";
import { runDaemon } from "../daemon/run.ts";
import { DEFAULT_DAEMON_OPTIONS } from "../daemon/daemon.ts";
import { PARAMETER_DEFAULTS, type ParameterName, type Parameters } from "../params.ts";

const PARAM_OPTIONS = Object.fromEntries(
  Object.keys(PARAMETER_DEFAULTS).map((
    name,
  ) => [name.replaceAll("_", "-"), { type: "string" as const }]),
);

export const daemon: Command = {
  name: "daemon",
  summary: "Run the blksnap daemon (the ublk server) in the foreground.",
  usage:
    "blksnap daemon [--socket PATH] [--log-file FILE] [--queues N] [--queue-depth N] [PARAMETERS]",
  help: `Options:
  --socket PATH           control socket (default /run/blksnap/control.sock, mode 0600)
  --log-file FILE         append log lines to FILE instead of stderr
  --queues N              ublk hardware queues per device (default ${DEFAULT_DAEMON_OPTIONS.queues})
  --queue-depth N         tags per queue (default ${DEFAULT_DAEMON_OPTIONS.queueDepth})
  --io-buffer-kib N       per-tag buffer, the largest request (default ${
    DEFAULT_DAEMON_OPTIONS.maxIoBufBytes / 1024
  }, 4..1024)
  --no-private-mounts     stay in the caller's mount namespace (not recommended)

Parameters (the kernel module's, same defaults):
${
    Object.entries(PARAMETER_DEFAULTS).map(([k, v]) => `  --${k.replaceAll("_", "-")}=${v}`).join(
      "\n",
    )
  }

Other commands start the daemon when it is not running. It runs in a private
mount namespace. SIGTERM or SIGINT removes every device it made and exits.
Needs root and the ublk_drv module (Linux 6.0 or later).`,
  options: {
    "log-file": { type: "string" },
    queues: { type: "string" },
    "queue-depth": { type: "string" },
    "io-buffer-kib": { type: "string" },
    "no-private-mounts": { type: "boolean" },
    ...PARAM_OPTIONS,
  },
  async run(ctx, values, positionals) {
    noPositionals(this, positionals);
    const queues = intOption(values, "queues", DEFAULT_DAEMON_OPTIONS.queues, 1, 64);
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
    const params: Parameters = { ...PARAMETER_DEFAULTS };
    for (const name of Object.keys(PARAMETER_DEFAULTS) as ParameterName[]) {
      params[name] = intOption(
        values,
        name.replaceAll("_", "-"),
        PARAMETER_DEFAULTS[name],
        0,
        2 ** 53,
      );
    }
    const logFile = values["log-file"];
    return await runDaemon({
        ...DEFAULT_DAEMON_OPTIONS,
        queues,
        queueDepth,
        socketPath: ctx.socketPath,
        privateMounts: values["no-private-mounts"] !== true,
        params,
        ...(typeof logFile === "string" ? { logFile } : {}),
      }) === 0
      ? EXIT.OK
      : EXIT.FAILED;
  },
};

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
