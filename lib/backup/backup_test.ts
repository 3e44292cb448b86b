import { deepStrictEqual as assertEquals, ok as assert, rejects, throws } from "node:assert/strict";
import { changedRanges, changeOrder, fullReason } from "./changes.ts";
import {
  cleanLeftovers,
  deviceKey,
  listPoints,
  type Manifest,
  manifestName,
  parsePointPath,
  pointId,
  readManifest,
  writeManifest,
} from "./manifest.ts";
import { type DeviceSource, writePoint, type WritePointOptions } from "./point.ts";
import { prune, restorePoint, restoreToFile, verifyPoint } from "./chain.ts";
import { Qcow2Image } from "./qcow2.ts";
import { mountsByDevice, openTarget } from "./target.ts";

const KiB = 1024;
const MiB = 1024 * KiB;
const CLUSTER = 64 * KiB;
const CBT_BLOCK = 16 * KiB;

/** Seeded xorshift32. */
function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x;
  };
}

function fill(data: Uint8Array, next: () => number): void {
  for (let i = 0; i < data.length; i += 4) {
    const v = next();
    for (let j = 0; j < 4 && i + j < data.length; j++) data[i + j] = (v >>> (8 * j)) & 0xff;
  }
}

/**
 * A device as a file, with a change tracker that behaves like lib/engine's
 * CbtMap (write map marked with the active number, a take copies it).
 */
class FakeDevice {
  readonly path: string;
  readonly content: Uint8Array;
  readonly write = new Uint8Array(0);
  #writeMap: Uint8Array;
  #readMap: Uint8Array;
  active = 1;
  previous = 0;
  generation = crypto.randomUUID();
  readonly next: () => number;

  constructor(path: string, sizeBytes: number, seed: number) {
    this.path = path;
    this.content = new Uint8Array(sizeBytes);
    this.next = rng(seed);
    const blocks = Math.ceil(sizeBytes / CBT_BLOCK);
    this.#writeMap = new Uint8Array(blocks);
    this.#readMap = new Uint8Array(blocks);
    Deno.writeFileSync(path, this.content);
  }

  /** Writes random data (or zeroes) at [offset, offset + length). */
  change(offset: number, length: number, zero = false): void {
    const part = this.content.subarray(offset, offset + length);
    if (zero) part.fill(0);
    else fill(part, this.next);
    const f = Deno.openSync(this.path, { write: true });
    f.seekSync(offset, Deno.SeekMode.Start);
    f.writeSync(part);
    f.close();
    for (
      let b = Math.floor(offset / CBT_BLOCK);
      b <= Math.floor((offset + length - 1) / CBT_BLOCK);
      b++
    ) {
      if (this.#writeMap[b]! < this.active) this.#writeMap[b] = this.active;
    }
  }

  /** A take: the state readcbtmap gives, and the content the image shows. */
  take(): { source: DeviceSource; image: Uint8Array } {
    this.previous = this.active;
    if (this.active === 255) {
      this.#writeMap.fill(0);
      this.generation = crypto.randomUUID();
      this.active = 1;
    } else {
      this.#readMap.set(this.#writeMap);
      this.active++;
    }
    return {
      source: {
        original: this.path,
        source: this.path,
        cbt: {
          generationId: this.generation,
          changesNumber: this.previous,
          blockBytes: CBT_BLOCK,
          map: this.#readMap.slice(),
        },
      },
      image: this.content.slice(),
    };
  }
}

/** Writes a point; through the pool of copy workers however small, unless told otherwise. */
async function mustWrite(dir: string, options: WritePointOptions): Promise<Manifest> {
  const m = await writePoint(dir, { poolMinBytes: 0, ...options });
  assert(m !== null, "a point was written");
  return m;
}

function tmpDir(): string {
  return Deno.makeTempDirSync({ prefix: "blksnap-backup-" });
}

function hasQemuImg(): boolean {
  try {
    return new Deno.Command("qemu-img", { args: ["--version"], stdout: "null", stderr: "null" })
      .outputSync().success;
  } catch {
    return false;
  }
}

function qemuImg(...args: string[]): { code: number; out: string } {
  const r = new Deno.Command("qemu-img", { args, stdout: "piped", stderr: "piped" }).outputSync();
  const dec = new TextDecoder();
  return { code: r.code, out: dec.decode(r.stdout) + dec.decode(r.stderr) };
}

async function restored(dir: string, id: string, key?: string): Promise<Uint8Array> {
  const out = `${dir}/../restore-${id}-${(key ?? "x").replace(/\W/g, "_")}.raw`;
  try {
    await restoreToFile(dir, id, key, out);
    return Deno.readFileSync(out);
  } finally {
    try {
      Deno.removeSync(out);
    } catch { /* not made */ }
  }
}

/** A full point and two incrementals of a seeded device; returns what each showed. */
async function threePoints(
  root: string,
  seed: number,
  compress = false,
): Promise<
  { dir: string; dev: FakeDevice; ids: string[]; images: Uint8Array[]; manifests: Manifest[] }
> {
  const dir = `${root}/backups`;
  Deno.mkdirSync(dir);
  const size = 8 * MiB + 3 * 512; // a partial cluster at the end
  const dev = new FakeDevice(`${root}/disk.img`, size, seed);
  dev.change(0, 3 * MiB); // data, then zeroes, then data at the very end
  dev.change(size - 700 * KiB, 700 * KiB);
  const ids: string[] = [];
  const images: Uint8Array[] = [];
  const manifests: Manifest[] = [];
  let t = Date.UTC(2026, 11, 2, 7, 0, 0);
  const point = async () => {
    const { source, image } = dev.take();
    const m = await mustWrite(dir, {
      devices: [source],
      snapshotId: crypto.randomUUID(),
      time: new Date(t += 3600_000),
      compress,
    });
    ids.push(m.id);
    images.push(image);
    manifests.push(m);
  };
  await point();
  dev.change(100 * KiB, 5000); // inside the second cluster
  dev.change(5 * MiB, 64 * KiB); // into the zero area
  dev.change(1 * MiB, 128 * KiB, true); // data becomes zeroes
  await point();
  dev.change(6 * MiB + 512, 1024);
  dev.change(size - 512, 512); // the last, partial cluster
  await point();
  return { dir, dev, ids, images, manifests };
}

Deno.test("backup: change numbers: a block changed since the backup of number P holds more than P", () => {
  const map = Uint8Array.from([0, 1, 2, 3, 3, 0, 4]);
  // CBT blocks of 16 KiB, clusters of 64 KiB: blocks 2,3 -> cluster 0; 4 -> cluster 1; 6 -> 1
  assertEquals(changedRanges(map, 2, 16 * KiB, 7 * 16 * KiB, 64 * KiB), [{
    start: 0,
    end: 7 * 16 * KiB,
  }]);
  assertEquals(changedRanges(map, 3, 16 * KiB, 7 * 16 * KiB, 64 * KiB), [{
    start: 64 * KiB,
    end: 7 * 16 * KiB,
  }]);
  assertEquals(changedRanges(map, 4, 16 * KiB, 7 * 16 * KiB, 64 * KiB), []);
  // clusters smaller than blocks, separate runs
  assertEquals(
    changedRanges(Uint8Array.from([5, 0, 5]), 4, 64 * KiB, 3 * 64 * KiB, 4 * KiB),
    [{ start: 0, end: 64 * KiB }, { start: 128 * KiB, end: 192 * KiB }],
  );
  // 255 begins a generation: after it every marked block (1..254) is newer
  assertEquals(changeOrder(255), 0);
  assertEquals(changedRanges(Uint8Array.from([0, 1, 0]), 255, 512, 1536, 512), [{
    start: 512,
    end: 1024,
  }]);
  const base = { generationId: "g", changesNumber: 3, sizeBytes: 100, clusterBytes: 512 };
  assertEquals(fullReason(base, { ...base, changesNumber: 4 }), null);
  assertEquals(fullReason({ ...base, changesNumber: 255 }, { ...base, changesNumber: 1 }), null);
  assert(/no earlier backup/.test(fullReason(undefined, base)!));
  assert(/generation changed/.test(fullReason(base, { ...base, generationId: "h" })!));
  assert(/did not advance/.test(fullReason(base, base)!));
  assert(/size changed/.test(fullReason(base, { ...base, changesNumber: 4, sizeBytes: 200 })!));
  assert(/no change map/.test(fullReason(base, { ...base, generationId: null })!));
});

Deno.test("backup: names: point ids, device keys, point paths", () => {
  const t = new Date(Date.UTC(2026, 11, 2, 7, 13, 0, 456));
  assertEquals(pointId(t, []), "20261202T071300Z");
  assertEquals(pointId(t, ["20261202T071300Z"]), "20261202T071300Z-2");
  assertEquals(deviceKey("/dev/loop0"), "loop0");
  assertEquals(deviceKey("/dev/mapper/vg-root"), "mapper-vg-root");
  assertEquals(deviceKey("/dev/loop0", ["loop0"]), "loop0-2");
  assertEquals(deviceKey("/dev/.../x y"), "_-x_y");
  assertEquals(parsePointPath("/b/20261202T071300Z.json"), { dir: "/b", id: "20261202T071300Z" });
  assertEquals(parsePointPath("b/20261202T071300Z"), { dir: "b", id: "20261202T071300Z" });
  throws(() => parsePointPath("/b/latest"), /does not name a backup point/);
});

Deno.test("backup: a full point and two incrementals restore exactly what each snapshot showed", async () => {
  const root = tmpDir();
  try {
    const { dir, ids, images, manifests } = await threePoints(root, 11);
    const [full, inc1, inc2] = manifests as [Manifest, Manifest, Manifest];
    assertEquals([full.kind, inc1.kind, inc2.kind], ["full", "incremental", "incremental"]);
    assert(/no earlier backup/.test(full.reason), full.reason);
    assertEquals([inc1.previous, inc2.previous], [ids[0], ids[1]]);
    assertEquals(inc1.devices[0]!.backing, full.devices[0]!.file);
    assertEquals([full.sequence, inc1.sequence, inc2.sequence], [1, 2, 3]);
    // zero clusters are not stored: 3 MiB + 700 KiB of data, rounded to clusters
    const d0 = full.devices[0]!;
    assertEquals(d0.bytesRead, d0.sizeBytes);
    assert(d0.bytesStored <= 3 * MiB + 768 * KiB, `stored ${d0.bytesStored}`);
    assert(d0.fileBytes < 4 * MiB + 256 * KiB, `file ${d0.fileBytes}`);
    // the incrementals read only the changed clusters
    assertEquals(inc1.devices[0]!.bytesRead, CLUSTER + CLUSTER + 2 * CLUSTER);
    assertEquals(inc2.devices[0]!.bytesRead, CLUSTER + 3 * 512);
    for (let i = 0; i < 3; i++) {
      assertEquals(await restored(dir, ids[i]!), images[i], `point ${i}`);
      const v = verifyPoint(dir, ids[i]!);
      assert(v.ok, JSON.stringify(v.problem));
      assertEquals(v.points, ids.slice(0, i + 1).reverse());
    }
    // what the manifest lists is what the listing shows
    assertEquals(listPoints(dir).map((l) => l.id), ids);
    assertEquals(readManifest(dir, ids[2]!), inc2);
  } finally {
    Deno.removeSync(root, { recursive: true });
  }
});

Deno.test("backup: compressed points restore exactly too", async () => {
  const root = tmpDir();
  try {
    const { dir, ids, images, manifests } = await threePoints(root, 12, true);
    assert(manifests.every((m) => m.devices[0]!.compressed));
    for (let i = 0; i < 3; i++) assertEquals(await restored(dir, ids[i]!), images[i], `point ${i}`);
  } finally {
    Deno.removeSync(root, { recursive: true });
  }
});

Deno.test(
  "backup: qemu-img checks and compares every point we write",
  { ignore: !hasQemuImg() },
  async () => {
    const root = tmpDir();
    try {
      const { dir, ids, images, manifests } = await threePoints(root, 13);
      for (let i = 0; i < 3; i++) {
        const q = `${dir}/${manifests[i]!.devices[0]!.file}`;
        const check = qemuImg("check", q);
        assertEquals(check.code, 0, check.out);
        Deno.writeFileSync(`${root}/expect.raw`, images[i]!);
        const cmp = qemuImg("compare", "-f", "qcow2", "-F", "raw", q, `${root}/expect.raw`);
        assertEquals(cmp.code, 0, `point ${i}: ${cmp.out}`);
      }
      const info = qemuImg("info", "--backing-chain", `${dir}/${manifests[2]!.devices[0]!.file}`);
      assertEquals((info.out.match(/^file format: qcow2/gm) ?? []).length, 3, info.out);
      assert(info.out.includes(`backing file: ${ids[1]}.`), info.out);
    } finally {
      Deno.removeSync(root, { recursive: true });
    }
  },
);

Deno.test("backup: a flipped byte in a stored cluster: verify names the extent, restore refuses", async () => {
  const root = tmpDir();
  try {
    const { dir, ids, manifests } = await threePoints(root, 14);
    const dev = manifests[1]!.devices[0]!;
    const file = `${dir}/${dev.file}`;
    // find where the second extent's first cluster is stored, and flip a byte there
    const ext = dev.extents[1]!;
    const img = Qcow2Image.open(file);
    const buf = new Uint8Array(CLUSTER);
    img.readCluster(ext.offset / CLUSTER, buf);
    img.close();
    const bytes = Deno.readFileSync(file);
    let at = -1;
    for (let i = CLUSTER; i + CLUSTER <= bytes.length; i += CLUSTER) {
      if (bytes.subarray(i, i + CLUSTER).every((b, j) => b === buf[j])) at = i;
    }
    assert(at > 0, "the cluster is in the file");
    bytes[at + 777] = bytes[at + 777]! ^ 0x40;
    Deno.writeFileSync(file, bytes);

    const v = verifyPoint(dir, ids[2]!);
    assertEquals(v.ok, false);
    assertEquals(v.problem!.point, ids[1]);
    assertEquals(v.problem!.device, dev.key);
    assertEquals([v.problem!.offset, v.problem!.length], [ext.offset, ext.length]);
    assert(/does not match its checksum/.test(v.problem!.message), v.problem!.message);
    // the full point below is still good
    assert(verifyPoint(dir, ids[0]!).ok);
    const out = `${root}/out.raw`;
    await rejects(
      () => restoreToFile(dir, ids[2]!, undefined, out),
      /is damaged, nothing was restored/,
    );
    throws(() => Deno.statSync(out), /No such file/);
    assertEquals([...Deno.readDirSync(root)].filter((e) => e.name.includes("restore")), []);
  } finally {
    Deno.removeSync(root, { recursive: true });
  }
});

Deno.test("backup: a broken chain: verify and restore say which file is missing; the next backup is full", async () => {
  const root = tmpDir();
  try {
    const { dir, dev, ids, manifests } = await threePoints(root, 15);
    Deno.removeSync(`${dir}/${manifests[0]!.devices[0]!.file}`);
    const v = verifyPoint(dir, ids[2]!);
    assertEquals(v.ok, false);
    assert(
      /Broken chain: point .* its file .* is missing/.test(v.problem!.message),
      v.problem!.message,
    );
    await rejects(() => restoreToFile(dir, ids[1]!, undefined, `${root}/x`), /Broken chain/);
    dev.change(0, 512);
    const { source, image } = dev.take();
    const m = await mustWrite(dir, { devices: [source], snapshotId: null });
    assertEquals(m.kind, "full");
    assert(/previous point cannot be used: Broken chain/.test(m.reason), m.reason);
    assertEquals(await restored(dir, m.id), image);
    // a missing manifest in the middle
    Deno.removeSync(`${dir}/${manifestName(ids[1]!)}`);
    assert(
      /builds on point .* which cannot be read/.test(verifyPoint(dir, ids[2]!).problem!.message),
    );
  } finally {
    Deno.removeSync(root, { recursive: true });
  }
});

Deno.test("backup: restore refuses a target that is smaller, and leaves it untouched", async () => {
  const root = tmpDir();
  try {
    const { dir, ids } = await threePoints(root, 16);
    const small = `${root}/small.img`;
    Deno.writeFileSync(small, new Uint8Array(8 * MiB).fill(7));
    await rejects(
      () => restoreToFile(dir, ids[0]!, undefined, small),
      /has 8388608 bytes, less than/,
    );
    assert(Deno.readFileSync(small).every((b) => b === 7));
    // a larger existing file is written like a device: the point's bytes, the rest kept
    const big = `${root}/big.img`;
    Deno.writeFileSync(big, new Uint8Array(9 * MiB).fill(7));
    await restoreToFile(dir, ids[2]!, undefined, big);
    const got = Deno.readFileSync(big);
    assertEquals(got.subarray(0, 8 * MiB + 1536), await restored(dir, ids[2]!));
    assert(got.subarray(8 * MiB + 1536).every((b) => b === 7));
    await rejects(
      () => restoreToFile(dir, ids[0]!, "nosuch", `${root}/y`),
      /has no device "nosuch"/,
    );
    // onto a file of its own chain: refused, the file untouched
    const base = `${dir}/${readManifest(dir, ids[0]!).devices[0]!.file}`;
    const baseBytes = Deno.readFileSync(base);
    await rejects(() => restoreToFile(dir, ids[2]!, undefined, base), /a file of point .* chain/);
    assertEquals(Deno.readFileSync(base), baseBytes);
    await rejects(
      () => restoreToFile(dir, "20200101T000000Z", undefined, `${root}/y`),
      /does not exist/,
    );
  } finally {
    Deno.removeSync(root, { recursive: true });
  }
});

Deno.test("backup: a generation change makes a full point that says why", async () => {
  const root = tmpDir();
  try {
    const { dir, dev, images } = await threePoints(root, 17);
    dev.active = 255; // the next take wraps
    dev.change(0, 4096);
    const { source, image } = dev.take();
    assertEquals(source.cbt!.changesNumber, 255);
    const m = await mustWrite(dir, { devices: [source], snapshotId: null });
    assertEquals(m.kind, "full");
    assert(/generation changed/.test(m.reason), m.reason);
    assertEquals(await restored(dir, m.id), image);
    // after the wrap take (255), the next take (1) is an incremental of it
    dev.change(2 * MiB, 4096);
    const t2 = dev.take();
    assertEquals(t2.source.cbt!.changesNumber, 1);
    const m2 = await mustWrite(dir, { devices: [t2.source], snapshotId: null });
    assertEquals(m2.kind, "incremental");
    assertEquals(m2.devices[0]!.bytesRead, CLUSTER);
    assertEquals(await restored(dir, m2.id), t2.image);
    assert(images.length === 3);
  } finally {
    Deno.removeSync(root, { recursive: true });
  }
});

Deno.test("backup: prune keeps N points; the oldest kept absorbs what it needs", async () => {
  const root = tmpDir();
  try {
    const { dir, ids, images, manifests } = await threePoints(root, 18);
    const r = prune(dir, 2);
    assertEquals(r, { kept: ids.slice(1), removed: [ids[0]!], absorbed: [ids[1]!] });
    assertEquals(listPoints(dir).map((l) => l.id), ids.slice(1));
    const m1 = readManifest(dir, ids[1]!);
    assertEquals([m1.kind, m1.previous, m1.devices[0]!.backing], ["full", null, null]);
    assert(/self-contained/.test(m1.reason));
    for (let i = 1; i < 3; i++) {
      assertEquals(await restored(dir, ids[i]!), images[i], `point ${i}`);
      assert(verifyPoint(dir, ids[i]!).ok);
    }
    const files = [...Deno.readDirSync(dir)].map((e) => e.name).sort();
    assertEquals(
      files,
      [
        manifests[1]!.devices[0]!.file,
        manifestName(ids[1]!),
        manifests[2]!.devices[0]!.file,
        manifestName(ids[2]!),
      ].sort(),
    );
    if (hasQemuImg()) {
      const check = qemuImg("check", `${dir}/${manifests[2]!.devices[0]!.file}`);
      assertEquals(check.code, 0, check.out);
      const info = qemuImg("info", "--backing-chain", `${dir}/${manifests[2]!.devices[0]!.file}`);
      assertEquals((info.out.match(/^file format: qcow2/gm) ?? []).length, 2, info.out);
    }
    assertEquals(prune(dir, 2).removed, []);
    assertEquals(prune(dir, 1).removed, [ids[1]]);
    assertEquals(await restored(dir, ids[2]!), images[2]);
    throws(() => prune(dir, 0), /at least 1/);
  } finally {
    Deno.removeSync(root, { recursive: true });
  }
});

Deno.test("backup: prune interrupted after the absorbed file was renamed: still correct, finished next time", async () => {
  const root = tmpDir();
  try {
    const { dir, ids, images, manifests } = await threePoints(root, 19);
    const old1 = readManifest(dir, ids[1]!);
    const m0 = Deno.readFileSync(`${dir}/${manifestName(ids[0]!)}`);
    const f0 = Deno.readFileSync(`${dir}/${manifests[0]!.devices[0]!.file}`);
    prune(dir, 2);
    // The state of a crash right after the rename of point 1's self-contained file.
    Deno.writeFileSync(`${dir}/${manifestName(ids[0]!)}`, m0);
    Deno.writeFileSync(`${dir}/${manifests[0]!.devices[0]!.file}`, f0);
    writeManifest(dir, old1);
    assertEquals(readManifest(dir, ids[1]!).kind, "incremental");
    for (let i = 0; i < 3; i++) {
      const v = verifyPoint(dir, ids[i]!);
      assert(v.ok, JSON.stringify(v.problem));
      assertEquals(await restored(dir, ids[i]!), images[i]);
    }
    const r = prune(dir, 2);
    assertEquals(r.removed, [ids[0]]);
    assertEquals(readManifest(dir, ids[1]!).kind, "full");
    for (let i = 1; i < 3; i++) {
      assert(verifyPoint(dir, ids[i]!).ok);
      assertEquals(await restored(dir, ids[i]!), images[i]);
    }
    // A manifest that still names a backing its file no longer has is put right by a prune.
    writeManifest(dir, old1);
    assertEquals(prune(dir, 2), { kept: ids.slice(1), removed: [], absorbed: [ids[1]!] });
    assertEquals(readManifest(dir, ids[1]!).previous, null);
  } finally {
    Deno.removeSync(root, { recursive: true });
  }
});

Deno.test("backup: prune refuses to absorb a damaged chain", async () => {
  const root = tmpDir();
  try {
    const { dir, ids, manifests } = await threePoints(root, 20);
    const f = `${dir}/${manifests[0]!.devices[0]!.file}`;
    const bytes = Deno.readFileSync(f);
    bytes[CLUSTER + 5] = bytes[CLUSTER + 5]! ^ 1; // the first data cluster
    Deno.writeFileSync(f, bytes);
    throws(() => prune(dir, 2), /Not pruning: point .* chain is damaged/);
    assertEquals(listPoints(dir).map((l) => l.id), ids);
  } finally {
    Deno.removeSync(root, { recursive: true });
  }
});

Deno.test("backup: leftovers of an interrupted run are removed; bad manifests are listed as errors", async () => {
  const root = tmpDir();
  try {
    const { dir, ids } = await threePoints(root, 21);
    Deno.writeTextFileSync(`${dir}/.tmp.20261203T000000Z.disk.img.qcow2`, "half");
    Deno.writeTextFileSync(`${dir}/20261203T000000Z.disk.img.qcow2`, "no manifest");
    Deno.writeTextFileSync(`${dir}/notes.txt`, "mine");
    assertEquals(cleanLeftovers(dir).sort(), [
      ".tmp.20261203T000000Z.disk.img.qcow2",
      "20261203T000000Z.disk.img.qcow2",
    ]);
    assert(Deno.statSync(`${dir}/notes.txt`).isFile);
    Deno.writeTextFileSync(`${dir}/20261204T000000Z.json`, "{ not json");
    Deno.writeTextFileSync(`${dir}/20261205T000000Z.json`, JSON.stringify({ format: "other" }));
    const l = listPoints(dir);
    assertEquals(l.map((x) => x.id), [...ids, "20261204T000000Z", "20261205T000000Z"]);
    assert("error" in l[3]! && /not JSON/.test(l[3].error));
    assert("error" in l[4]! && /format is "other"/.test(l[4].error));
    throws(() => readManifest(dir, "20261205T000000Z"), /not a valid blksnap backup manifest/);
    // a manifest that lies about its extents is refused when written
    const m = readManifest(dir, ids[0]!);
    throws(
      () =>
        writeManifest(dir, {
          ...m,
          devices: [{ ...m.devices[0]!, extents: [{ offset: 1, length: 1, sha256: "x" }] }],
        }),
      /bad extent/,
    );
  } finally {
    Deno.removeSync(root, { recursive: true });
  }
});

Deno.test("backup: a source that is missing or of a bad size is a clear error, and nothing is written", async () => {
  const root = tmpDir();
  try {
    const dir = `${root}/b`;
    Deno.mkdirSync(dir);
    await rejects(
      writePoint(dir, {
        devices: [{ original: "/x", source: `${root}/none`, cbt: null }],
        snapshotId: null,
      }),
      /Cannot open the source/,
    );
    Deno.writeFileSync(`${root}/odd`, new Uint8Array(1000));
    await rejects(
      writePoint(dir, {
        devices: [{ original: "/x", source: `${root}/odd`, cbt: null }],
        snapshotId: null,
      }),
      /not a positive multiple of 512/,
    );
    assertEquals([...Deno.readDirSync(dir)], []);
  } finally {
    Deno.removeSync(root, { recursive: true });
  }
});

Deno.test("backup: nothing changed: skipUnchanged writes no point; a failing beforeCommit or an abort leaves none", async () => {
  const root = tmpDir();
  try {
    const { dir, dev, ids } = await threePoints(root, 22);
    const t = dev.take();
    assertEquals(
      await writePoint(dir, { devices: [t.source], snapshotId: null, skipUnchanged: true }),
      null,
    );
    dev.change(0, 512);
    const t2 = dev.take();
    await rejects(
      writePoint(dir, {
        devices: [t2.source],
        snapshotId: null,
        beforeCommit: () => Promise.reject(new Error("the snapshot overflowed")),
      }),
      /overflowed/,
    );
    const ac = new AbortController();
    ac.abort(new Error("killed"));
    await rejects(
      writePoint(dir, {
        devices: [t2.source],
        snapshotId: null,
        signal: ac.signal,
        poolMinBytes: 0,
      }),
      /killed/,
    );
    assertEquals(listPoints(dir).map((l) => l.id), ids);
    assertEquals([...Deno.readDirSync(dir)].length, 6);
    // and the next run still makes a correct incremental of everything since the last point
    const m = await mustWrite(dir, { devices: [t2.source], snapshotId: null });
    assertEquals([m.kind, m.previous], ["incremental", ids[2]]);
    assertEquals(await restored(dir, m.id), t2.image);
  } finally {
    Deno.removeSync(root, { recursive: true });
  }
});

Deno.test("backup: restore targets: mounted devices are found in mountinfo by MAJ:MIN", async () => {
  const text = [
    "22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw",
    "36 22 7:0 / /mnt/with\\040space rw - ext4 /dev/loop0 rw",
    "37 22 7:0 /sub /srv/bind rw - ext4 /dev/loop0 rw",
    "garbage",
    "",
  ].join("\n");
  const m = mountsByDevice(text);
  assertEquals(m.get("7:0"), ["/mnt/with space", "/srv/bind"]);
  assertEquals(m.get("259:2"), ["/"]);
  assertEquals(m.get("8:0"), undefined);
  // a regular file target goes the file way (no libc)
  const dir = tmpDir();
  try {
    const t = openTarget(`${dir}/new.img`, 4096);
    assertEquals([t.fresh, t.sizeBytes], [true, 4096]);
    await t.write(0, new Uint8Array(512).fill(1));
    t.commit();
    t.close();
    assertEquals(Deno.statSync(`${dir}/new.img`).size, 4096);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("backup: restore clears zero clusters without writing them: holes in a file, over old data too", async () => {
  const root = tmpDir();
  try {
    const { dir, ids, images } = await threePoints(root, 31);
    const image = images[2]!;
    const m = readManifest(dir, ids[2]!);
    const size = m.devices[0]!.sizeBytes;
    let zeroBytes = 0;
    for (let at = 0; at < size; at += CLUSTER) {
      if (image.subarray(at, Math.min(size, at + CLUSTER)).every((b) => b === 0)) {
        zeroBytes += Math.min(CLUSTER, size - at);
      }
    }
    assert(zeroBytes >= 4 * MiB, `the image has ${zeroBytes} bytes of zero clusters`);
    const allocated = (path: string) => (Deno.statSync(path).blocks ?? 0) * 512;

    // A new file: zero clusters are holes, never written.
    const fresh = `${root}/fresh.img`;
    const t1 = openTarget(fresh, size);
    let r;
    try {
      r = await restorePoint(dir, ids[2]!, undefined, t1);
    } finally {
      t1.close();
    }
    assertEquals(Deno.readFileSync(fresh), image);
    assertEquals([r.bytesWritten, r.bytesZeroed], [size - zeroBytes, zeroBytes]);
    assert(allocated(fresh) <= size - zeroBytes + 64 * KiB, `${allocated(fresh)} bytes allocated`);

    // An existing file full of random data: the zero clusters must read as zeroes afterwards
    // (punched holes where the filesystem can, zeroes written where it cannot).
    const old = `${root}/old.img`;
    const noise = new Uint8Array(size);
    fill(noise, rng(77));
    Deno.writeFileSync(old, noise);
    // openTarget punches holes through libc (FFI); without FFI permission it writes zeroes
    // in runs instead.
    const ffi = Deno.permissions.querySync({ name: "ffi" }).state === "granted";
    const t2 = openTarget(old, size);
    try {
      r = await restorePoint(dir, ids[2]!, undefined, t2);
    } finally {
      t2.close();
    }
    assertEquals(Deno.readFileSync(old), image);
    assertEquals([r.bytesWritten, r.bytesZeroed], [size - zeroBytes, zeroBytes]);
    if (ffi) {
      assert(allocated(old) <= size - zeroBytes + 64 * KiB, `${allocated(old)} bytes allocated`);
    }
  } finally {
    Deno.removeSync(root, { recursive: true });
  }
});

Deno.test("backup: the copy workers and the main thread write the same qcow2 bytes and extents", async () => {
  const root = tmpDir();
  try {
    const size = 13 * MiB + 3 * 512;
    const dev = new FakeDevice(`${root}/disk.img`, size, 41);
    dev.change(0, 5 * MiB);
    dev.change(6 * MiB, 64 * KiB, true);
    dev.change(9 * MiB + 4096, 3 * MiB);
    // compressible clusters too
    const text = new TextEncoder().encode("blksnap ".repeat(8192));
    const f = Deno.openSync(dev.path, { write: true });
    f.seekSync(2 * MiB, Deno.SeekMode.Start);
    f.writeSync(text);
    f.close();
    const { source } = dev.take();
    for (const compress of [false, true]) {
      const files: Uint8Array[] = [];
      const extents: unknown[] = [];
      for (const poolMinBytes of [0, Infinity]) {
        const dir = `${root}/b-${compress}-${poolMinBytes}`;
        Deno.mkdirSync(dir);
        const m = await mustWrite(dir, {
          devices: [source],
          snapshotId: null,
          time: new Date(Date.UTC(2026, 0, 1)),
          compress,
          poolMinBytes,
        });
        files.push(Deno.readFileSync(`${dir}/${m.devices[0]!.file}`));
        extents.push(m.devices[0]!.extents);
        assert(verifyPoint(dir, m.id).ok);
      }
      assertEquals(files[0], files[1], `compress ${compress}: the same file`);
      assertEquals(extents[0], extents[1], `compress ${compress}: the same extents`);
    }
  } finally {
    Deno.removeSync(root, { recursive: true });
  }
});

Deno.test("backup: a failure while the next piece is being read: the read ends first, no crash", async () => {
  const root = tmpDir();
  try {
    const dir = `${root}/b`;
    Deno.mkdirSync(dir);
    const dev = new FakeDevice(`${root}/disk.img`, 12 * MiB, 23);
    dev.change(0, 12 * MiB);
    const { source } = dev.take();
    await rejects(
      writePoint(dir, {
        devices: [source],
        snapshotId: null,
        poolMinBytes: 0, // pieces in flight in the workers
        onProgress: () => {
          throw new Error("the target filesystem is full");
        },
      }),
      /the target filesystem is full/,
    );
    assertEquals([...Deno.readDirSync(dir)], []);
  } finally {
    Deno.removeSync(root, { recursive: true });
  }
});

Deno.test("backup: two devices in one point: each chains on its own, restore picks by key", async () => {
  const root = tmpDir();
  try {
    const dir = `${root}/b`;
    Deno.mkdirSync(dir);
    Deno.mkdirSync(`${root}/x`);
    const a = new FakeDevice(`${root}/disk.img`, 2 * MiB, 31);
    const b = new FakeDevice(`${root}/x/disk.img`, 3 * MiB + 512, 32);
    a.change(0, MiB);
    b.change(MiB, MiB);
    const t1 = [a.take(), b.take()];
    const m1 = await mustWrite(dir, { devices: t1.map((t) => t.source), snapshotId: null });
    assertEquals(m1.devices.map((d) => d.key), [
      deviceKey(a.path),
      deviceKey(b.path, [deviceKey(a.path)]),
    ]);
    b.change(3 * MiB, 512);
    const t2 = [a.take(), b.take()];
    const m2 = await mustWrite(dir, { devices: t2.map((t) => t.source), snapshotId: null });
    assertEquals(m2.devices.map((d) => [d.kind, d.bytesRead]), [["incremental", 0], [
      "incremental",
      512,
    ]]);
    assertEquals(m2.devices.map((d) => d.key), m1.devices.map((d) => d.key));
    await rejects(() => restored(dir, m2.id), /holds 2 devices .*: say which with --device/);
    assertEquals(await restored(dir, m2.id, m2.devices[0]!.key), t2[0]!.image);
    assertEquals(await restored(dir, m2.id, m2.devices[1]!.key), t2[1]!.image);
    assertEquals(await restored(dir, m1.id, b.path), t1[1]!.image);
    assert(verifyPoint(dir, m2.id).ok);
  } finally {
    Deno.removeSync(root, { recursive: true });
  }
});

Deno.test("backup: prune stopped after any of its steps (a crash) leaves every point correct, and the next prune finishes", async () => {
  const root = tmpDir();
  try {
    const { dir, ids, images } = await threePoints(root, 41);
    const pristine = `${root}/pristine`;
    Deno.mkdirSync(pristine);
    for (const e of Deno.readDirSync(dir)) {
      Deno.copyFileSync(`${dir}/${e.name}`, `${pristine}/${e.name}`);
    }
    const steps: string[] = [];
    prune(dir, 1, { step: (what) => steps.push(what) });
    // Point 2 absorbs (its file, its manifest), then points 1 and 0 go, each manifest first.
    assertEquals(steps.length, 2 + 2 * 2);
    for (let k = 0; k < steps.length; k++) {
      const work = `${root}/crash${k}`;
      Deno.mkdirSync(work);
      for (const e of Deno.readDirSync(pristine)) {
        Deno.copyFileSync(`${pristine}/${e.name}`, `${work}/${e.name}`);
      }
      let n = 0;
      throws(() =>
        prune(work, 1, {
          step: () => {
            if (n++ === k) throw new Error("crash");
          },
        }), /crash/);
      for (const l of listPoints(work)) {
        assert("manifest" in l, `after step ${k} (${steps[k]}): ${JSON.stringify(l)}`);
        const i = ids.indexOf(l.id);
        const v = verifyPoint(work, l.id);
        assert(v.ok, `after step ${k} (${steps[k]}): ${l.id}: ${v.problem?.message}`);
        assertEquals(await restored(work, l.id), images[i], `after step ${k}: ${l.id}`);
      }
      assert(listPoints(work).some((l) => l.id === ids[2]), "the kept point is always there");
      prune(work, 1);
      assertEquals(listPoints(work).map((l) => l.id), [ids[2]]);
      assertEquals(readManifest(work, ids[2]!).kind, "full");
      assertEquals(await restored(work, ids[2]!), images[2]);
      assertEquals([...Deno.readDirSync(work)].length, 2, `after step ${k}: leftovers`);
    }
  } finally {
    Deno.removeSync(root, { recursive: true });
  }
});
