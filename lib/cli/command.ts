/**
 * The shape of a CLI command and the helpers every command shares: option
 * parsing (node:util parseArgs: `--opt value`, `--opt=value`, short options),
 * output in text or JSON, and the exit statuses.
 */
import { parseArgs, type ParseArgsConfig } from "node:util";
import {
  Client,
  DaemonUnavailableError,
  devicesLeftBehind,
  NoDaemonError,
  startDaemon,
} from "../daemon/client.ts";
import {
  type ArgsOf,
  DEFAULT_SOCKET_PATH,
  type Op,
  type Request,
  type ResultOf,
} from "../daemon/protocol.ts";

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
  /**
   * Options that take several values after one flag, like the tool's boost
   * "multitoken" options (`-d /dev/sda /dev/sdb`): the words that follow such
   * an option, up to the next option, are more values of it. They must be
   * declared `multiple: true`.
   */
  multitoken?: string[];
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

/** The operation failed on this side (a file that does not exist...): exit 1. */
export class CommandError extends Error {
  readonly code: string;
  constructor(code: string, message: string) {
    super(message);
    this.name = "CommandError";
    this.code = code;
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

  /**
   * A connection to the daemon, starting one (and saying so on stderr) when
   * none runs — also without `autostart` when a daemon that died left devices
   * behind: the new one takes them over.
   */
  async daemon(autostart = true): Promise<Client> {
    if (this.#client) return this.#client;
    try {
      this.#client = await Client.connect(this.socketPath);
    } catch (err) {
      if (!(err instanceof NoDaemonError)) throw err;
      if (!autostart && !devicesLeftBehind(this.socketPath)) throw err;
      const extra = (Deno.env.get("BLKSNAP_DAEMON_ARGS") ?? "").split(/\s+/).filter((s) => s);
      const pid = await startDaemon({ socketPath: this.socketPath, daemonArgs: extra });
      console.error(`blksnap: started the daemon (pid ${pid}, socket ${this.socketPath})`);
      this.#client = await Client.connect(this.socketPath);
    }
    return this.#client;
  }

  /**
   * A connection to a running daemon; never starts one. Without a daemon
   * nothing is tracked and no snapshot exists: NoDaemonError (exit 3) whose
   * message ends with `consequence`.
   */
  async runningDaemon(consequence: string): Promise<Client> {
    try {
      return await this.daemon(false);
    } catch (err) {
      if (err instanceof NoDaemonError) throw new NoDaemonError(`${err.message}: ${consequence}`);
      throw err;
    }
  }

  /**
   * One request with the types of protocol.ts. A connection the daemon broke
   * (it exited meanwhile) is DaemonUnavailableError (exit 3), like a closed one.
   */
  async call<O extends Op>(client: Client, op: O, args: ArgsOf<O>): Promise<ResultOf<O>> {
    try {
      return await client.request(op as Op, args as Request["args"]) as ResultOf<O>;
    } catch (err) {
      if (
        err instanceof Deno.errors.BrokenPipe || err instanceof Deno.errors.ConnectionReset ||
        err instanceof Deno.errors.ConnectionAborted || err instanceof Deno.errors.UnexpectedEof
      ) {
        throw new DaemonUnavailableError(`The daemon closed the connection (${err.message})`);
      }
      throw err;
    }
  }

  close(): void {
    this.#client?.close();
  }

  /**
   * Prints `text` or, with --json, the value as one line of JSON. A `text`
   * of null prints nothing (commands that are silent on success, like the tool).
   */
  print(value: unknown, text: string | null): void {
    if (this.json) console.log(JSON.stringify(value));
    else if (text !== null) console.log(text);
  }
}

export function parseCommandLine(
  cmd: Command,
  argv: string[],
): { values: Values; positionals: string[] } {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      options: { ...COMMON_OPTIONS, ...cmd.options },
      allowPositionals: true,
      strict: true,
      tokens: true,
    });
  } catch (err) {
    throw new UsageError((err as Error).message.split(". To specify a positional")[0]!);
  }
  const values: Values = { ...parsed.values };
  const multi = new Set(cmd.multitoken ?? []);
  if (multi.size === 0) return { values, positionals: parsed.positionals };
  // Words after a multitoken option, up to the next option or "--", are its values
  // (in command-line order).
  for (const name of multi) delete values[name];
  const positionals: string[] = [];
  let owner: string | undefined;
  const add = (name: string, value: string) => {
    const list = values[name];
    values[name] = [...(Array.isArray(list) ? list : []), value];
  };
  for (const t of parsed.tokens) {
    if (t.kind === "option") {
      owner = multi.has(t.name) ? t.name : undefined;
      if (owner !== undefined && t.value !== undefined) add(owner, t.value);
    } else if (t.kind === "option-terminator") owner = undefined;
    else if (owner !== undefined) add(owner, t.value);
    else positionals.push(t.value);
  }
  return { values, positionals };
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
