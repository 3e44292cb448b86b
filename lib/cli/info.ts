/**
 * `version` and `help`.
 */
import { type Command, EXIT, helpText, UsageError } from "./command.ts";
import { VERSION } from "../version.ts";
import { PROTOCOL_VERSION } from "../daemon/protocol.ts";

export const version: Command = {
  name: "version",
  summary: "Print the program's version (major.minor.revision.build).",
  usage: "blksnap version",
  help: "Needs no daemon. With --json also prints the protocol version and runtime.",
  options: {},
  run(ctx) {
    ctx.print(
      { version: VERSION, protocol: PROTOCOL_VERSION, deno: Deno.version.deno },
      VERSION,
    );
    return Promise.resolve(EXIT.OK);
  },
};

export function makeHelp(commands: () => Command[]): Command {
  return {
    name: "help",
    summary: "Show the commands, or one command's help.",
    usage: "blksnap help [COMMAND]",
    help: "Same as `blksnap --help` and `blksnap COMMAND --help`.",
    options: {},
    run(ctx, _values, positionals) {
      const all = commands();
      if (positionals.length > 0) {
        const cmd = all.find((c) => c.name === positionals[0]);
        if (!cmd) throw new UsageError(`Unknown command "${positionals[0]}"`);
        console.log(helpText(cmd));
        return Promise.resolve(EXIT.OK);
      }
      ctx.print(
        { commands: all.map((c) => ({ name: c.name, summary: c.summary })) },
        overview(all),
      );
      return Promise.resolve(EXIT.OK);
    },
  };
}

export function overview(all: Command[]): string {
  const width = Math.max(...all.map((c) => c.name.length));
  return `blksnap ${VERSION}: block-device snapshots and change tracking over ublk

Usage: blksnap COMMAND [OPTIONS]

Commands:
${all.map((c) => `  ${c.name.padEnd(width)}  ${c.summary}`).join("\n")}

Run "blksnap COMMAND --help" for a command's options. Every command accepts --json.
Exit status: 0 success, 1 the operation failed, 2 bad command line, 3 no daemon;
backup also 4 nothing to do, 5 snapshot overflow, 6 another backup runs.`;
}
