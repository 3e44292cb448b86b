/**
 * backup, restore, verify and backups against a fake daemon whose "snapshot
 * images" are files: what backup asks the daemon, what it writes, its exit
 * statuses, and the other commands on what it wrote.
 */
import {
  deepStrictEqual as assertEquals,
  match as assertMatch,
  ok as assert,
} from "node:assert/strict";
import { cli, type Handler, withFakeDaemon } from "./_test_util.ts";
import type { Envelope } from "../daemon/protocol.ts";
import { BlksnapError } from "../../ffi/errno.ts";
import { BACKUP_EXIT } from "./backup.ts";

const MiB = 1024 * 1024;
const BLOCK = 64 * 1024;
const SIZE = 4 * MiB;
const GEN = "d4c3b2a1-0000-4000-8000-123456789abc";

/** A tracked device of the fake daemon: content, CBT maps and numbers, like the engine's CbtMap. */
class Fake {
  content = new Uint8Array(SIZE);
  writeMap = new Uint8Array(SIZE / BLOCK);
  readMap = new Uint8Array(SIZE / BLOCK);
  active = 1;
  previous = 0;
  snapshot: string | null = null;
  errorCode = 0;
  destroyed: string[] = [];
  readonly dir: string;
  seed = 1;

  constructor(dir: string) {
    this.dir = dir;
  }

  change(offset: number, length: number): void {
    for (let i = 0; i < length; i++) {
      this.seed = (this.seed * 1103515245 + 12345) >>> 0;
      this.content[offset + i] = this.seed >>> 24;
    }
    for (let b = Math.floor(offset / BLOCK); b <= Math.floor((offset + length - 1) / BLOCK); b++) {
      this.writeMap[b] = this.active;
    }
  }

  readonly handler: Handler = (req: Envelope) => {
    const a = req.args as Record<string, unknown>;
    const cbt = () => ({
      device: "/dev/loop7",
      tracked: "/dev/ublkb7",
      blockSize: BLOCK,
      deviceCapacity: SIZE,
      blockCount: SIZE / BLOCK,
      generationId: GEN,
      changesNumber: this.previous,
    });
    const known = (d: unknown) => d === "/dev/loop7" || d === "/dev/ublkb7";
    switch (req.op) {
      case "cbtinfo":
        if (!known(a.device)) {
          throw new BlksnapError(
            "ENOENT",
            `Cannot read the CBT of "${a.device}": it is not tracked`,
          );
        }
        return cbt();
      case "snapshot_create":
        // A backup's snapshot must go with its connection (a killed run leaks none).
        if (a.session !== true) throw new BlksnapError("EINVAL", "backup asked for no session");
        this.snapshot = crypto.randomUUID();
        return { id: this.snapshot };
      case "snapshot_take": {
        this.previous = this.active++;
        this.readMap.set(this.writeMap);
        Deno.writeFileSync(`${this.dir}/image`, this.content);
        return {
          id: a.id,
          images: [{ original: "/dev/loop7", tracked: "/dev/ublkb7", image: `${this.dir}/image` }],
          frozen: [],
        };
      }
      case "readcbtmap":
        return { ...cbt(), map: btoa(String.fromCharCode(...this.readMap)) };
      case "snapshot_info":
        return { device: a.device, id: this.snapshot, errorCode: this.errorCode, image: "" };
      case "snapshot_destroy":
        if (a.id !== this.snapshot) throw new BlksnapError("ESRCH", `No snapshot ${a.id}`);
        this.destroyed.push(a.id as string);
        this.snapshot = null;
        return { id: a.id };
      default:
        throw new BlksnapError("EINVAL", `unexpected ${req.op}`);
    }
  };
}

async function withFake(
  fn: (f: Fake, socket: string, dir: string) => Promise<void>,
): Promise<void> {
  const root = Deno.makeTempDirSync({ prefix: "blksnap-cli-backup-" });
  try {
    Deno.mkdirSync(`${root}/b`);
    const f = new Fake(root);
    await withFakeDaemon(f.handler, (d) => fn(f, d.socket, `${root}/b`));
  } finally {
    Deno.removeSync(root, { recursive: true });
  }
}

Deno.test("cli backup: full, then incremental, then nothing to do; backups, verify, restore", async () => {
  await withFake(async (f, socket, dir) => {
    f.change(0, MiB);
    let r = await cli(socket, "backup", "--device", "/dev/loop7", "--to", dir, "--json");
    assertEquals(r.code, 0, r.err);
    const full = JSON.parse(r.out);
    assertEquals(full.kind, "full");
    assertMatch(full.reason, /no earlier backup/);
    assertEquals(full.devices[0].bytesRead, SIZE);
    assertEquals(f.destroyed.length, 1);
    const image1 = f.content.slice();

    f.change(2 * MiB + 100, 10);
    r = await cli(socket, "backup", "-d", "/dev/ublkb7", "--to", dir, "--json", "--compress");
    assertEquals(r.code, 0, r.err);
    const inc = JSON.parse(r.out);
    assertEquals([inc.kind, inc.previous], ["incremental", full.point]);
    assertEquals(inc.devices[0].bytesRead, BLOCK);
    assertEquals(inc.devices[0].changesNumber, 2);

    r = await cli(socket, "backup", "-d", "/dev/loop7", "--to", dir);
    assertEquals([r.code, r.out, r.err], [BACKUP_EXIT.NOTHING_TO_DO, "", ""]);
    assertEquals(f.destroyed.length, 3);
    assertEquals(f.snapshot, null);

    r = await cli(socket, "backups", "--in", dir);
    assertEquals(r.code, 0, r.err);
    assertMatch(r.out, new RegExp(`${inc.point} .* incr .* loop7 +${inc.point} <- ${full.point}`));
    r = await cli(socket, "verify", "--from", `${dir}/${inc.point}.json`);
    assertEquals(r.code, 0, r.err);
    assertMatch(r.out, /^ok: 2 point\(s\)/);
    r = await cli(socket, "restore", "--from", `${dir}/${full.point}`, "--to", `${dir}/../r1`);
    assertEquals(r.code, 0, r.err);
    assertEquals(Deno.readFileSync(`${dir}/../r1`), image1);
    r = await cli(
      socket,
      "restore",
      "--from",
      `${dir}/${inc.point}.json`,
      "--to",
      `${dir}/../r2`,
      "--json",
    );
    assertEquals(r.code, 0, r.err);
    assertEquals(JSON.parse(r.out).verified, true);
    assertEquals(Deno.readFileSync(`${dir}/../r2`), f.content);

    // --keep 1 with a new point: the new one absorbs, the others go
    f.change(3 * MiB, 1);
    r = await cli(socket, "backup", "-d", "/dev/loop7", "--to", dir, "--keep", "1", "--json");
    assertEquals(r.code, 0, r.err);
    const last = JSON.parse(r.out);
    assertEquals(last.pruned.removed, [full.point, inc.point]);
    r = await cli(socket, "restore", "--from", `${dir}/${last.point}`, "--to", `${dir}/../r3`);
    assertEquals(r.code, 0, r.err);
    assertEquals(Deno.readFileSync(`${dir}/../r3`), f.content);
  });
});

Deno.test("cli backup: an untracked device, a busy directory, an overflow, a leftover snapshot", async () => {
  await withFake(async (f, socket, dir) => {
    let r = await cli(socket, "backup", "-d", "/dev/sdz", "--to", dir);
    assertEquals(r.code, 1);
    assertMatch(r.err, /\/dev\/sdz is not tracked: attach it .*blksnap attach --device \/dev\/sdz/);
    assertEquals(f.snapshot, null);
    assertEquals([...Deno.readDirSync(dir)], [], "nothing written to DIR");

    // another run holds the lock
    const lock = Deno.openSync(`${dir}/.lock`, { read: true, write: true, create: true });
    lock.lockSync(true);
    r = await cli(socket, "backup", "-d", "/dev/loop7", "--to", dir);
    lock.close();
    assertEquals(r.code, BACKUP_EXIT.LOCKED);
    assertMatch(r.err, /Another backup or prune .* is running/);

    // the snapshot overflows during the copy: no point, the snapshot destroyed, exit 5
    f.change(0, 4096);
    f.errorCode = -28;
    r = await cli(socket, "backup", "-d", "/dev/loop7", "--to", dir);
    assertEquals(r.code, BACKUP_EXIT.OVERFLOW);
    assertMatch(r.err, /overflowed .* larger --limit/);
    assertEquals(f.snapshot, null);
    assertEquals(
      [...Deno.readDirSync(dir)].map((e) => e.name).filter((n) => !n.startsWith(".lock")),
      [],
    );
    f.errorCode = 0;

    // a killed run left its snapshot: the next run destroys it
    f.snapshot = "0b5a3c1e-9f7d-4c2b-8a61-3e5d7f9b1c2a";
    Deno.writeTextFileSync(`${dir}/.snapshot`, f.snapshot + "\n");
    Deno.writeTextFileSync(`${dir}/.tmp.20260101T000000Z.loop7.qcow2`, "half");
    r = await cli(socket, "backup", "-d", "/dev/loop7", "--to", dir, "-v");
    assertEquals(r.code, 0, r.err);
    assertMatch(r.err, /destroyed snapshot 0b5a3c1e-.* left by an interrupted backup/);
    assertMatch(r.out, /\/dev\/loop7: full \(no earlier backup/);
    assertEquals(f.destroyed.at(-2), "0b5a3c1e-9f7d-4c2b-8a61-3e5d7f9b1c2a");
    assert(
      !Deno.readDirSync(dir).some((e) => e.name.startsWith(".tmp.") || e.name === ".snapshot"),
    );
  });
});

Deno.test("cli verify and restore: a corrupted point, a small target, bad arguments", async () => {
  await withFake(async (f, socket, dir) => {
    f.change(0, 2 * MiB);
    let r = await cli(socket, "backup", "-d", "/dev/loop7", "--to", dir, "--json");
    assertEquals(r.code, 0, r.err);
    const p = JSON.parse(r.out);
    const file = `${dir}/${p.devices[0].file}`;
    const bytes = Deno.readFileSync(file);
    bytes[64 * 1024 + 10] = bytes[64 * 1024 + 10]! ^ 1; // the first data cluster
    Deno.writeFileSync(file, bytes);
    r = await cli(socket, "verify", "--from", `${dir}/${p.point}.json`);
    assertEquals(r.code, 1);
    assertMatch(r.err, new RegExp(`point ${p.point}, device loop7, offset 0, length 2097152`));
    r = await cli(socket, "restore", "--from", `${dir}/${p.point}.json`, "--to", `${dir}/../out`);
    assertEquals(r.code, 1);
    assertMatch(r.err, /is damaged, nothing was restored/);
    Deno.writeFileSync(`${dir}/../small`, new Uint8Array(MiB));
    r = await cli(
      socket,
      "restore",
      "--from",
      `${dir}/${p.point}.json`,
      "--to",
      `${dir}/../small`,
      "--no-verify",
    );
    assertEquals(r.code, 1);
    assertMatch(r.err, /less than the 4194304/);

    r = await cli(socket, "backup", "--to", dir);
    assertEquals(r.code, 2);
    assertMatch(r.err, /--device is required/);
    r = await cli(socket, "backup", "-d", "/dev/loop7", "--to", `${dir}/nope`);
    assertEquals(r.code, 1);
    assertMatch(r.err, /does not exist/);
    r = await cli(socket, "verify", "--from", `${dir}/latest`);
    assertEquals(r.code, 2);
    r = await cli(socket, "verify", "--from", `${dir}/20200101T000000Z.json`, "--json");
    assertEquals(r.code, 1);
    assertEquals(JSON.parse(r.out).error.code, "ENOENT");
    r = await cli(socket, "backups", "--in", `${dir}/nope`);
    assertEquals(r.code, 1);
  });
});
