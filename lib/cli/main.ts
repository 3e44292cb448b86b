/**
 * The command line: find the command, parse its options, run it, and turn
 * every error into a message on stderr and an exit status.
 */
import {
  type Command,
  CommandError,
  Context,
  EXIT,
  helpText,
  parseCommandLine,
  UsageError,
} from "./command.ts";
import { attach, detach, recover, status } from "./devices.ts";
import { cbtinfo, markdirtyblock, readcbtmap } from "./cbt.ts";
import {
  snapshot_add,
  snapshot_collect,
  snapshot_create,
  snapshot_destroy,
  snapshot_info,
  snapshot_take,
  snapshot_waitevent,
  snapshot_watcher,
} from "./snapshot.ts";
import { daemon } from "./daemon_cmd.ts";
import { backup, backups, restore, verify } from "./backup.ts";
import { makeHelp, overview, version } from "./info.ts";
import { DaemonError, DaemonUnavailableError } from "../daemon/client.ts";
import { ErrnoError } from "../../ffi/errno.ts";

const help = makeHelp(() => COMMANDS);
const COMMANDS: Command[] = [
  version,
  attach,
  detach,
  status,
  recover,
  cbtinfo,
  readcbtmap,
  markdirtyblock,
  snapshot_create,
  snapshot_add,
  snapshot_take,
  snapshot_info,
  snapshot_waitevent,
  snapshot_watcher,
  snapshot_collect,
  snapshot_destroy,
  backup,
  restore,
  verify,
  backups,
  daemon,
  help,
];

export async function main(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (name === undefined || name === "--help" || name === "-h") {
    console.log(overview(COMMANDS));
    return name === undefined ? EXIT.USAGE : EXIT.OK;
  }
  const json = rest.includes("--json");
  const cmd = COMMANDS.find((c) => c.name === name);
  if (!cmd) {
    return fail(
      json,
      EXIT.USAGE,
      "EINVAL",
      `Unknown command "${name}". Run "blksnap help" for the list.`,
    );
  }
  let ctx: Context | undefined;
  try {
    const { values, positionals } = parseCommandLine(cmd, rest);
    if (values.help) {
      console.log(helpText(cmd));
      return EXIT.OK;
    }
    ctx = new Context(values);
    return await cmd.run(ctx, values, positionals);
  } catch (err) {
    if (err instanceof UsageError) {
      return fail(
        json,
        EXIT.USAGE,
        "EINVAL",
        `${err.message}\nRun "blksnap ${cmd.name} --help" for usage.`,
      );
    }
    if (err instanceof DaemonError) return fail(json, EXIT.FAILED, err.code, err.message);
    if (err instanceof CommandError) return fail(json, EXIT.FAILED, err.code, err.message);
    if (err instanceof DaemonUnavailableError) {
      return fail(json, EXIT.NO_DAEMON, "ESRCH", err.message);
    }
    if (err instanceof ErrnoError) return fail(json, EXIT.FAILED, err.code, err.message);
    throw err;
  } finally {
    ctx?.close();
  }
}

function fail(json: boolean, status: number, code: string, message: string): number {
  if (json) console.log(JSON.stringify({ error: { code, message } }));
  console.error(`blksnap: ${message}`);
  return status;
}
