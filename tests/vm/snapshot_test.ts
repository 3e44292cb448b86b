/**
 * Snapshots on a real kernel, as stories: ext4 on tracked loop devices,
 * files with known checksums before and after a take, the images mounted
 * and checked, the tracked devices checked after destroy. Runs inside the VM.
 */
import {
  deepStrictEqual as assertEquals,
  match as assertMatch,
  ok as assert,
} from "node:assert/strict";
import {
  assertNoUblkDevices,
  Cli,
  Loop,
  MAIN,
  pseudoRandomBytes,
  run,
  sh,
  sha256,
  vmTest,
} from "./_helpers.ts";
import type { StatusResult } from "../../lib/daemon/protocol.ts";

interface Take {
  id: string;
  images: Array<{ original: string; tracked: string; image: string }>;
}

/** Writes `count` files of assorted sizes under `dir`; returns name -> sha256. */
async function writeFiles(
  dir: string,
  prefix: string,
  seed: number,
  count: number,
): Promise<Map<string, string>> {
  const sums = new Map<string, string>();
  for (let i = 0; i < count; i++) {
    const size = [4096, 70_000, 1 << 20, 3 * (1 << 20) + 517][i % 4]!;
    const name = `${prefix}${i}.bin`;
    await Deno.writeFile(`${dir}/${name}`, pseudoRandomBytes(seed + i, size));
    sums.set(name, await sha256(`${dir}/${name}`));
  }
  return sums;
}

async function checkFiles(dir: string, sums: Map<string, string>, what: string): Promise<void> {
  for (const [name, sum] of sums) {
    assertEquals(await sha256(`${dir}/${name}`), sum, `${what}: ${name} differs`);
  }
}

function listBin(dir: string): string[] {
  return [...Deno.readDirSync(dir)].map((e) => e.name).filter((n) => n.endsWith(".bin")).sort();
}

for (const sectorSize of [512, 4096]) {
  vmTest(
    `two devices in one snapshot (${sectorSize}-byte sectors): images show the files from before the take`,
    async () => {
      const cli = new Cli(`snap${sectorSize}`);
      const loops = [
        await Loop.create(96, sectorSize),
        await Loop.create(96, sectorSize),
      ];
      const mounts: string[] = [];
      const diffDir = `/tmp/diff-${sectorSize}`;
      await Deno.mkdir(diffDir, { recursive: true });
      // 4096-byte devices keep their difference storage on a 512-byte block
      // device, taken with direct I/O; 512-byte ones in a directory.
      const storageLoop = sectorSize === 4096 ? await Loop.create(256) : undefined;
      try {
        const tracked: string[] = [];
        for (const l of loops) tracked.push(await cli.ok("attach", "--device", l.path));
        const before: Array<Map<string, string>> = [];
        for (const [i, t] of tracked.entries()) {
          await sh("mkfs.ext4", "-q", "-F", t);
          const m = `/mnt/s${sectorSize}-${i}`;
          await Deno.mkdir(m, { recursive: true });
          await sh("mount", t, m);
          mounts.push(m);
          before.push(await writeFiles(m, "before", 100 * i + sectorSize, 8));
        }
        const id = await cli.ok(
          "snapshot_create",
          "--device",
          loops[0]!.path,
          "--device",
          tracked[1]!,
          "--file",
          storageLoop?.path ?? diffDir,
          "--limit",
          "512M",
        );
        assertMatch(id, /^[0-9a-f-]{36}$/);
        assertEquals(await cli.ok("snapshot_collect"), id);
        const take = await cli.json<Take>("snapshot_take", "--id", id);
        assertEquals(take.images.length, 2);
        const storage = (await cli.json<StatusResult>("status")).snapshots![0]!.storage;
        assertEquals(storage.io, storageLoop ? "direct" : "buffered", JSON.stringify(storage));
        // the image of each device, as snapshot_info reports it
        const images: string[] = [];
        for (const l of loops) {
          const image = await cli.ok("snapshot_info", "--device", l.path, "--field", "image");
          assertMatch(image, /^\/dev\/ublkb\d+$/);
          images.push(image);
          const size = Number(await sh("blockdev", "--getsize64", image));
          assertEquals(size, 96 * 1024 * 1024);
          assertEquals(
            Number(await sh("blockdev", "--getss", image)),
            sectorSize,
            "the image has the original's logical sector size",
          );
        }

        // after the take: overwrite some old files, add new ones
        const after: Array<Map<string, string>> = [];
        for (const [i, m] of mounts.entries()) {
          for (const name of [...before[i]!.keys()].slice(0, 4)) {
            await Deno.writeFile(`${m}/${name}`, pseudoRandomBytes(9999 + i, 200_000));
          }
          after.push(await writeFiles(m, "after", 500 + i, 6));
        }
        await sh("sync");

        // each image shows exactly the files from before
        for (const [i, image] of images.entries()) {
          const m = `/mnt/img${sectorSize}-${i}`;
          await Deno.mkdir(m, { recursive: true });
          await sh("mount", image, m);
          try {
            assertEquals(listBin(m), [...before[i]!.keys()].sort());
            await checkFiles(m, before[i]!, `image ${i}`);
            // files written to the image survive a remount of it
            await Deno.writeFile(`${m}/onimage.bin`, pseudoRandomBytes(77 + i, 300_000));
          } finally {
            await sh("umount", m);
          }
          await sh("mount", image, m);
          try {
            assertEquals(
              await sha256(`${m}/onimage.bin`),
              await sha256Bytes(pseudoRandomBytes(77 + i, 300_000)),
            );
            await checkFiles(m, before[i]!, `image ${i} after remount`);
          } finally {
            await sh("umount", m);
          }
          // an image of an unmounted filesystem is clean
          const fsck = await run("e2fsck", ["-fn", image]);
          assertEquals(fsck.code, 0, `e2fsck of image ${i}:\n${fsck.stdout}${fsck.stderr}`);
        }
        const info = await cli.ok("snapshot_info", "--device", loops[0]!.path);
        assertMatch(info, /error_code=0/);

        // destroy: refused while an image is mounted, then done
        await sh("mount", images[0]!, `/mnt/img${sectorSize}-0`);
        const refused = await cli.run("snapshot_destroy", "--id", id);
        assert(refused.code !== 0, "destroy with a mounted image must fail");
        assertMatch(refused.stderr, /in use|mounted/);
        await sh("umount", `/mnt/img${sectorSize}-0`);
        await cli.ok("snapshot_destroy", "--id", id);
        assertEquals(await cli.ok("snapshot_collect"), "");
        assertEquals([...Deno.readDirSync(diffDir)], [], "nothing left in the storage directory");

        // the tracked devices hold the files from after
        for (const [i, m] of mounts.entries()) {
          await checkFiles(m, after[i]!, `tracked ${i}`);
          for (const name of [...before[i]!.keys()].slice(4)) {
            assertEquals(await sha256(`${m}/${name}`), before[i]!.get(name));
          }
        }
        for (const m of mounts.splice(0)) await sh("umount", m);
        for (const l of loops) await cli.ok("detach", "--device", l.path);
        for (const l of loops) {
          const fsck = await run("e2fsck", ["-fn", l.path]);
          assertEquals(fsck.code, 0, `e2fsck of ${l.path}:\n${fsck.stdout}${fsck.stderr}`);
        }
        await cli.stopDaemon();
        assertNoUblkDevices();
      } finally {
        for (const m of mounts) await run("umount", [m]);
        await cli.stopDaemon().catch(() => {});
        for (const l of loops) await l.destroy();
        await storageLoop?.destroy();
      }
    },
  );
}

async function sha256Bytes(data: Uint8Array): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", new Uint8Array(data));
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

vmTest("contrib/blksnap-image writes a coherent image of a busy device and cleans up", async () => {
  const cli = new Cli("contrib");
  const loop = await Loop.create(64);
  const bin = "/tmp/contrib-bin";
  const out = "/tmp/contrib-out";
  await Deno.mkdir(bin, { recursive: true });
  await Deno.mkdir(out, { recursive: true });
  // the cron job runs `blksnap` from PATH: a wrapper around this checkout
  await Deno.writeTextFile(
    `${bin}/blksnap`,
    `#!/bin/sh\nexec ${Deno.execPath()} run -A --quiet ${MAIN} "$@"\n`,
  );
  await Deno.chmod(`${bin}/blksnap`, 0o755);
  try {
    const tracked = await cli.ok("attach", "--device", loop.path);
    await Deno.writeFile(tracked, pseudoRandomBytes(4242, 64 << 20));
    await sh("sync");
    const expected = await sha256(tracked);
    const script = new URL("../../contrib/blksnap-image", import.meta.url).pathname;
    const r = await run("sh", [script, loop.path, out], {
      PATH: `${bin}:${Deno.env.get("PATH")}`,
      BLKSNAP_SOCKET: cli.socket,
      BLKSNAP_DIFF_DIR: "/tmp",
      BLKSNAP_LIMIT: "64M",
    });
    assertEquals(r.code, 0, `blksnap-image failed:\n${r.stdout}${r.stderr}`);
    const files = [...Deno.readDirSync(out)].map((e) => e.name).sort();
    const img = files.find((f) => f.endsWith(".img"));
    assert(img !== undefined, `no image in ${files.join(" ")}`);
    assertEquals(await sha256(`${out}/${img}`), expected, "the image file is the device's content");
    const cbtinfo = await Deno.readTextFile(`${out}/${img.replace(/\.img$/, ".cbtinfo")}`);
    const blocks = Number(/block_count=(\d+)/.exec(cbtinfo)?.[1]);
    assertEquals((await Deno.stat(`${out}/${img.replace(/\.img$/, ".cbt")}`)).size, blocks);
    assertEquals(await cli.ok("snapshot_collect"), "", "the script destroyed its snapshot");
    await cli.ok("detach", "--device", loop.path);
    await cli.stopDaemon();
    assertNoUblkDevices();
  } finally {
    await cli.stopDaemon().catch(() => {});
    await loop.destroy();
    await Deno.remove(out, { recursive: true }).catch(() => {});
  }
});
