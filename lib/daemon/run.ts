/**
 * `blksnap daemon`: set up the process, open the ublk control plane, serve the
 * socket, and delete every device on SIGTERM/SIGINT; on a handover (the
 * protocol's op, or SIGUSR2) exit leaving the tracked devices quiesced.
 */
import { cString, type Libc, MNT_DETACH, openLibc } from "../../ffi/libc.ts";
import { openLiburing } from "../../ffi/liburing.ts";
import { Daemon, type DaemonOptions, log } from "./daemon.ts";
import { ControlServer } from "./server.ts";
import { DaemonLock } from "./daemon_lock.ts";
import { besideSocket } from "./state_file.ts";

/**
 * The exit status of a daemon that handed its devices over (EX_TEMPFAIL):
 * the shipped systemd unit restarts on it (RestartForceExitStatus).
 */
export const EXIT_HANDOVER = 75;

export interface RunDaemonOptions extends DaemonOptions {
  logFile?: string;
  /** Re-exec in a private mount namespace (default true). */
  privateMounts: boolean;
}

export async function runDaemon(opts: RunDaemonOptions): Promise<number> {
  if (opts.logFile) redirectLogs(opts.logFile);
  const libc = openLibc();
  if (opts.privateMounts) {
    enterPrivateMountNamespace(libc);
    dropUblkMounts(libc);
  }
  // Before anything else: of two daemons started together, one goes on.
  const dir = opts.socketPath.slice(0, opts.socketPath.lastIndexOf("/")) || "/";
  Deno.mkdirSync(dir, { recursive: true, mode: 0o755 });
  let lock: DaemonLock;
  try {
    lock = DaemonLock.acquire(besideSocket(opts.socketPath, "lock"));
  } catch (err) {
    log(`${err instanceof Error ? err.message : err}: not starting a second one`);
    return 1;
  }
  const uring = openLiburing();
  const daemon = await Daemon.start(libc, uring.symbols, opts);
  let server: ControlServer;
  try {
    server = await ControlServer.listen(daemon, opts.socketPath);
  } catch (err) {
    await daemon.shutdown();
    lock.release();
    throw err;
  }
  log(`pid ${Deno.pid} listening on ${opts.socketPath}`);
  // Requests that arrive meanwhile wait in the socket's backlog.
  const report = await daemon.recoverPrevious();
  if (report.recovered.length + report.unrecovered.length + report.removed.length > 0) {
    log(
      `took over from pid ${report.previousPid}: ${report.recovered.length} recovered, ` +
        `${report.unrecovered.length} not recovered, ${report.removed.length} removed, ` +
        `${report.lostSnapshots.length} snapshots lost`,
    );
  }
  for (const f of await daemon.foreignDevices()) {
    log(
      `warning: ublk device ${f.ublkId} (${f.state}) belongs to ${
        f.pidAlive ? `running process ${f.pid}` : `process ${f.pid}, which is gone`
      }${
        f.state === "quiesced"
          ? "; I/O to /dev/ublkb" + f.ublkId + " blocks until it is recovered"
          : ""
      }`,
    );
  }

  let stopping: Promise<void> | undefined;
  const stop = (why: string) => {
    stopping ??= (async () => {
      log(`${why}: removing every device and exiting`);
      server.close();
      await daemon.shutdown();
    })();
    return stopping;
  };
  const stopLogged = (why: string) =>
    stop(why).catch((err) => log(`shutdown failed: ${err instanceof Error ? err.stack : err}`));
  for (const sig of ["SIGTERM", "SIGINT", "SIGHUP"] as const) {
    Deno.addSignalListener(sig, () => void stopLogged(sig));
  }
  server.shutdownRequested.then(() => stopLogged("shutdown requested"));
  // A handover: exit at once, devices and all. The kernel quiesces each
  // tracked device (user recovery) and the next daemon takes it over.
  server.handoverRequested.then(() => {
    server.close();
    lock.release();
    log(`handed over: exiting with ${EXIT_HANDOVER}, tracked devices left to the next daemon`);
    Deno.exit(EXIT_HANDOVER);
  });
  Deno.addSignalListener("SIGUSR2", () => {
    daemon.prepareHandover(false).then(
      () => server.handoverAfterSignal(),
      (err) => log(`SIGUSR2: no handover: ${err instanceof Error ? err.message : err}`),
    );
  });
  try {
    await server.serve();
  } finally {
    // However serving ended, the devices go with the daemon.
    await stopLogged("socket closed");
  }
  lock.release();
  log("exited cleanly");
  return 0;
}

/**
 * The daemon must not share a mount namespace with the users of its devices:
 * a mount of its own device in a namespace that dies with it deadlocks its
 * exit (docs/ublk.md §5). unshare(CLONE_NEWNS) fails in a threaded
 * process, so re-exec through unshare(1), which keeps the pid.
 */
function enterPrivateMountNamespace(libc: Libc): void {
  if (Deno.env.get("BLKSNAP_DAEMON_NS") === "1") return;
  let self: string;
  let init: string;
  try {
    self = Deno.readLinkSync("/proc/self/ns/mnt");
    init = Deno.readLinkSync("/proc/1/ns/mnt");
  } catch {
    return; // no procfs access: stay
  }
  if (self !== init) return; // already private (systemd PrivateMounts=, unshare)
  const unshare = ["/usr/bin/unshare", "/bin/unshare"].find((p) => {
    try {
      return Deno.statSync(p).isFile;
    } catch {
      return false;
    }
  });
  if (!unshare) {
    log("warning: unshare(1) not found; running in the shared mount namespace");
    return;
  }
  const argv = Deno.readTextFileSync("/proc/self/cmdline").split("\0").filter((_, i, a) =>
    i < a.length - 1
  );
  Deno.env.set("BLKSNAP_DAEMON_NS", "1");
  const args = [
    unshare,
    "--mount",
    "--propagation",
    "private",
    "--",
    Deno.execPath(),
    ...argv.slice(1),
  ];
  const strings = args.map(cString);
  const ptrs = new BigUint64Array(strings.length + 1);
  strings.forEach((s, i) => (ptrs[i] = BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(s)))));
  libc.sym.execv(strings[0]!, new Uint8Array(ptrs.buffer));
  log(
    `warning: execv(${unshare}) failed (errno ${libc.errno()}); running in the shared mount namespace`,
  );
}

/**
 * The private namespace starts as a copy of the caller's, with every
 * filesystem mounted there at that moment: mounts of ublk devices (this
 * program's tracked devices and images, e.g. those a dead daemon left) would
 * stay pinned here after the user unmounts them, and detach would find them
 * busy. Detach them from this namespace only (lazily: nothing is written).
 */
function dropUblkMounts(libc: Libc): void {
  let self: string;
  try {
    if (Deno.readLinkSync("/proc/self/ns/mnt") === Deno.readLinkSync("/proc/1/ns/mnt")) return;
    self = Deno.readTextFileSync("/proc/self/mountinfo");
  } catch {
    return;
  }
  const targets: string[] = [];
  for (const line of self.split("\n")) {
    // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS... - FSTYPE SOURCE SUPER-OPTIONS
    const [left, right] = line.split(" - ");
    if (!left || !right) continue;
    const source = right.split(" ")[1] ?? "";
    if (!/^\/dev\/ublkb\d+(p\d+)?$/.test(source)) continue;
    const mountPoint = (left.split(" ")[4] ?? "").replace(
      /\\([0-7]{3})/g,
      (_, o: string) => String.fromCharCode(parseInt(o, 8)),
    );
    if (mountPoint) targets.push(mountPoint);
  }
  // Deepest first, so a mount on top of another goes before it.
  for (const t of targets.sort((a, b) => b.length - a.length)) {
    if (libc.sym.umount2(cString(t), MNT_DETACH) !== 0) {
      log(`warning: cannot drop ${t} from the daemon's mount namespace (errno ${libc.errno()})`);
    }
  }
}

function redirectLogs(path: string): void {
  const file = Deno.openSync(path, { append: true, create: true, mode: 0o600 });
  const enc = new TextEncoder();
  const write = (...parts: unknown[]) => {
    const line = `${new Date().toISOString()} ${parts.map(String).join(" ")}\n`;
    file.writeSync(enc.encode(line));
  };
  console.error = write;
  console.log = write;
  console.warn = write;
}
