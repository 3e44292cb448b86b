import { deepStrictEqual as assertEquals, ok as assert, throws } from "node:assert/strict";
import { type ClusterKind, Qcow2Image, Qcow2Writer } from "./qcow2.ts";

const KiB = 1024;

/** Seeded xorshift bytes; `compressible` repeats short runs so deflate gains. */
function bytes(seed: number, length: number, compressible = false): Uint8Array {
  const out = new Uint8Array(length);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    if (!compressible || i % 64 === 0) {
      x ^= x << 13;
      x >>>= 0;
      x ^= x >>> 17;
      x ^= x << 5;
      x >>>= 0;
    }
    out[i] = compressible ? x & 0x0f : (x >>> (8 * (i & 3))) & 0xff;
  }
  return out;
}

/** A disk of `clusters` clusters: each data, zero, or (for incrementals) untouched. */
interface Plan {
  sizeBytes: number;
  clusterBytes: number;
  /** Content per written cluster; absent: not written. */
  clusters: Map<number, Uint8Array>;
}

function plan(seed: number, sizeBytes: number, clusterBytes: number, compressible: boolean): Plan {
  const clusters = new Map<number, Uint8Array>();
  const count = Math.ceil(sizeBytes / clusterBytes);
  for (let c = 0; c < count; c++) {
    const len = Math.min(clusterBytes, sizeBytes - c * clusterBytes);
    const r = (seed * 7919 + c * 104729) % 10;
    if (r < 3) continue; // not written
    clusters.set(c, r < 5 ? new Uint8Array(len) : bytes(seed * 1000 + c, len, compressible));
  }
  return { sizeBytes, clusterBytes, clusters };
}

function write(path: string, p: Plan, options: { backing?: string; compress?: boolean }): void {
  const w = Qcow2Writer.create(path, {
    sizeBytes: p.sizeBytes,
    clusterBits: Math.log2(p.clusterBytes),
    ...(options.backing !== undefined ? { backingFile: options.backing } : {}),
    compress: options.compress ?? false,
  });
  // out of order on purpose
  const order = [...p.clusters.keys()].sort((a, b) => ((a * 37) % 11) - ((b * 37) % 11) || a - b);
  for (const c of order) w.writeCluster(c, p.clusters.get(c)!);
  w.finish();
}

/** The disk's content as a chain of plans shows it (the last one on top). */
function expected(chain: Plan[]): Uint8Array {
  const top = chain[chain.length - 1]!;
  const out = new Uint8Array(top.sizeBytes);
  for (const p of chain) {
    for (const [c, data] of p.clusters) out.set(data, c * p.clusterBytes);
  }
  return out;
}

/** Reads a chain with Qcow2Image, following backing files. */
function readChain(path: string): Uint8Array {
  const images: Qcow2Image[] = [];
  try {
    let at: string | undefined = path;
    while (at !== undefined) {
      const img = Qcow2Image.open(at);
      images.push(img);
      at = img.backingFile === undefined
        ? undefined
        : `${at.slice(0, at.lastIndexOf("/") + 1)}${img.backingFile}`;
    }
    const top = images[0]!;
    const out = new Uint8Array(top.sizeBytes);
    const buf = new Uint8Array(top.clusterBytes);
    for (let c = 0; c < top.clusterCount; c++) {
      let kind: ClusterKind = "unallocated";
      for (const img of images) {
        kind = img.readCluster(c, buf);
        if (kind !== "unallocated") break;
      }
      const len = Math.min(top.clusterBytes, top.sizeBytes - c * top.clusterBytes);
      if (kind !== "unallocated") out.set(buf.subarray(0, len), c * top.clusterBytes);
    }
    return out;
  } finally {
    for (const img of images) img.close();
  }
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

const CASES = [
  { name: "64 KiB clusters", size: 3 * 1024 * KiB + 7 * 512, cluster: 64 * KiB },
  { name: "4 KiB clusters, several L2 tables", size: 9 * 1024 * KiB, cluster: 4 * KiB },
  { name: "512-byte clusters, refcount blocks chained", size: 9 * 1024 * KiB, cluster: 512 },
];

for (const { name, size, cluster } of CASES) {
  for (const compress of [false, true]) {
    Deno.test(`qcow2: a full image and two incrementals read back exactly (${name}${compress ? ", compressed" : ""})`, () => {
      const dir = Deno.makeTempDirSync();
      try {
        const chain = [1, 2, 3].map((s) => plan(s, size, cluster, compress));
        write(`${dir}/p1.qcow2`, chain[0]!, { compress });
        write(`${dir}/p2.qcow2`, chain[1]!, { backing: "p1.qcow2", compress });
        write(`${dir}/p3.qcow2`, chain[2]!, { backing: "p2.qcow2", compress });
        for (let i = 1; i <= 3; i++) {
          assertEquals(readChain(`${dir}/p${i}.qcow2`), expected(chain.slice(0, i)), `point ${i}`);
        }
        // a zero cluster over non-zero backing data reads as zeroes
        const zeroOverData = [...chain[1]!.clusters].find(([c, d]) =>
          d.every((b) => b === 0) && chain[0]!.clusters.get(c)?.some((b) => b !== 0)
        );
        assert(zeroOverData !== undefined, "the plans have a zero cluster over data");
        const img = Qcow2Image.open(`${dir}/p2.qcow2`);
        assertEquals(img.kind(zeroOverData[0]), "zero");
        assertEquals(img.backingFile, "p1.qcow2");
        img.close();
      } finally {
        Deno.removeSync(dir, { recursive: true });
      }
    });
  }
}

Deno.test(
  "qcow2: qemu-img checks, compares and converts what we write",
  { ignore: !hasQemuImg() },
  () => {
    const dir = Deno.makeTempDirSync();
    try {
      for (const { size, cluster } of CASES) {
        for (const compress of [false, true]) {
          const chain = [4, 5].map((s) => plan(s, size, cluster, compress));
          write(`${dir}/a.qcow2`, chain[0]!, { compress });
          write(`${dir}/b.qcow2`, chain[1]!, { backing: "a.qcow2", compress });
          const tag = `${cluster}-byte clusters${compress ? ", compressed" : ""}`;
          for (const f of ["a", "b"]) {
            const check = qemuImg("check", `${dir}/${f}.qcow2`);
            assertEquals(check.code, 0, `qemu-img check ${f} (${tag}):\n${check.out}`);
            assert(/No errors were found/.test(check.out), check.out);
          }
          const info = qemuImg("info", "--backing-chain", `${dir}/b.qcow2`);
          assertEquals(info.code, 0, info.out);
          assert(/backing file: a\.qcow2/.test(info.out), info.out);
          assert(/backing file format: qcow2/.test(info.out), info.out);
          assertEquals((info.out.match(/^file format: qcow2/gm) ?? []).length, 2, info.out);
          for (const [i, f] of ["a", "b"].entries()) {
            Deno.writeFileSync(`${dir}/${f}.raw`, expected(chain.slice(0, i + 1)));
            const cmp = qemuImg(
              "compare",
              "-f",
              "qcow2",
              "-F",
              "raw",
              `${dir}/${f}.qcow2`,
              `${dir}/${f}.raw`,
            );
            assertEquals(cmp.code, 0, `qemu-img compare ${f} (${tag}):\n${cmp.out}`);
          }
          const conv = qemuImg("convert", "-O", "raw", `${dir}/b.qcow2`, `${dir}/b.out`);
          assertEquals(conv.code, 0, conv.out);
          assertEquals(Deno.readFileSync(`${dir}/b.out`), expected(chain));
          // and we read what qemu-img writes
          const q = qemuImg(
            "convert",
            "-O",
            "qcow2",
            ...(compress ? ["-c"] : []),
            `${dir}/b.raw`,
            `${dir}/q.qcow2`,
          );
          assertEquals(q.code, 0, q.out);
          assertEquals(readChain(`${dir}/q.qcow2`), expected(chain));
        }
      }
    } finally {
      Deno.removeSync(dir, { recursive: true });
    }
  },
);

Deno.test("qcow2: wrong use is a clear error", () => {
  const dir = Deno.makeTempDirSync();
  try {
    throws(() => Qcow2Writer.create(`${dir}/x`, { sizeBytes: 1000 }), /multiple of 512/);
    throws(() => Qcow2Writer.create(`${dir}/x`, { sizeBytes: 0 }), /bad virtual size/);
    throws(() => Qcow2Writer.create(`${dir}/x`, { sizeBytes: 512, clusterBits: 8 }), /9\.\.21/);
    const w = Qcow2Writer.create(`${dir}/x`, { sizeBytes: 1 << 20, backingFile: "base" });
    throws(() => w.writeCluster(16, new Uint8Array(64 * KiB)), /outside the disk/);
    throws(() => w.writeCluster(0, new Uint8Array(100)), /has 100 bytes/);
    w.writeCluster(1, bytes(1, 64 * KiB));
    throws(() => w.writeCluster(1, bytes(2, 64 * KiB)), /written twice/);
    w.zeroCluster(2);
    throws(() => w.zeroCluster(2), /written twice/);
    w.finish();
    throws(() => w.writeCluster(3, bytes(3, 64 * KiB)), /finished/);
    throws(() => w.finish(), /finished/);

    Deno.writeFileSync(`${dir}/junk`, bytes(9, 4096));
    throws(() => Qcow2Image.open(`${dir}/junk`), /not a usable qcow2 image: no qcow2 magic/);
    Deno.writeFileSync(`${dir}/short`, new Uint8Array(10));
    throws(() => Qcow2Image.open(`${dir}/short`), /shorter than a qcow2 header/);
    // a truncated image: its L1 table is gone
    const whole = Deno.readFileSync(`${dir}/x`);
    Deno.writeFileSync(`${dir}/cut`, whole.subarray(0, 64 * KiB));
    throws(() => Qcow2Image.open(`${dir}/cut`), /outside the file/);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});
