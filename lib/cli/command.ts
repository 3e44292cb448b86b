/**
 * The shape of a CLI command and the helpers every command shares: option
 * parsing (node:util parseArgs: `--opt value`, `--opt=value`, short options),
 * output in text or JSON, and the exit statuses.
 */
import { parseArgs, type ParseArgsConfig } from "node:util";
import { Client, NoDaemonError, startDaemon } from "../daemon/client.ts";
import { DEFAULT_SOCKET_PATH } from "../daemon/server.ts";

/** Exit statuses (README "Exit status"). */
export const EXIT = {
  OK: 0,
  /** The operation failed; the message says why. */
  FAILED: 1,
  /** Bad command line. */
  USAGE: 2,
  /** No daemon could be reached or started. */
  NO_DAEMON: 3,
} as const;

export type OptionSpec = NonNullable<ParseArgsConfig["options"]>;

export interface Command {
  name: string;
  summary: string;
  usage: string;
  /** Full help text after the usage line. */
  help: string;
  options: OptionSpec;
  /** Commands that talk to the daemon get a Context; `daemon`, `version`, `help` do not need one. */
  run(ctx: Context, values: Values, positionals: string[]): Promise<number>;
}

export type Values = Record<string, string | boolean | Array<string | boolean> | undefined>;

/** An error in the command line; printed with the usage hint, exit 2. */
export class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "UsageError";
  }
}

export const COMMON_OPTIONS: OptionSpec = {
  json: { type: "boolean" },
  help: { type: "boolean", short: "h" },
  socket: { type: "string" },
};

export class Context {
  readonly json: boolean;
  readonly socketPath: string;
  #client: Client | undefined;

  constructor(values: Values) {
    this.json = values.json === true;
    this.socketPath = typeof values.socket === "string"
      ? values.socket
      : (Deno.env.get("BLKSNAP_SOCKET") || DEFAULT_SOCKET_PATH);
  }

  /** A connection to the daemon, starting one (and saying so on stderr) when none runs. */
  async daemon(autostart = true): Promise<Client> {
    if (this.#client) return this.#client;
    try {
      this.#client = await Client.connect(this.socketPath);
    } catch (err) {
      if (!(err instanceof NoDaemonError) || !autostart) throw err;
      const extra = (Deno.env.get("BLKSNAP_DAEMON_ARGS") ?? "").split(/\s+/).filter((s) => s);
      const pid = await startDaemon({ socketPath: this.socketPath, daemonArgs: extra });
      console.error(`blksnap: started the daemon (pid ${pid}, socket ${this.socketPath})`);
      this.#client = await Client.connect(this.socketPath);
    }
    return this.#client;
  }

  close(): void {
    this.#client?.close();
  }

  /** Prints `text` or, with --json, the value as one line of JSON. */
  print(value: unknown, text: string): void {
    console.log(this.json ? JSON.stringify(value) : text);
  }
}

export function parseCommandLine(cmd: Command, argv: string[]) {
  try {
    return parseArgs({
      args: argv,
      options: { ...COMMON_OPTIONS, ...cmd.options },
      allowPositionals: true,
      strict: true,
    });
  } catch (err) {
    throw new UsageError((err as Error).message.split(". To specify a positional")[0]!);
  }
}

export function requireString(values: Values, name: string, cmd: Command): string {
  const v = values[name];
  if (typeof v !== "string" || v === "") {
    throw new UsageError(`${cmd.name}: --${name} is required`);
  }
  return v;
}

export function noPositionals(cmd: Command, positionals: string[]): void {
  if (positionals.length > 0) {
    throw new UsageError(`${cmd.name}: unexpected argument "${positionals[0]}"`);
  }
}

export function helpText(cmd: Command): string {
  return `Usage: ${cmd.usage}\n\n${cmd.summary}\n\n${cmd.help.trimEnd()}\n\n` +
    `Common options:\n  --json           machine-readable output (one JSON document)\n` +
    `  --socket PATH    the daemon's control socket (default ${DEFAULT_SOCKET_PATH},\n` +
    `                   or $BLKSNAP_SOCKET)\n  -h, --help       this help\n`;
}
