/**
 * The JavaScript each request costs on a queue thread, without the kernel:
 * the targets' start and completion hooks (passthrough reads, tracked-device
 * reads and writes, with parts of the write path switched off by
 * BLKSNAP_PROFILE_WRITE_PATH, the CBT map in a file as the daemon keeps it,
 * and image reads of a take with every other chunk stored) against a fake
 * ring that only fills SQEs. Prints the best of 15 rounds in ns per request.
 *
 * Natively: `deno task bench:micro`. Under the VM's emulation, where the
 * figures are 20-30 times larger and floating point and atomics weigh more:
 * `bash tools/vm.sh run -- deno run -A --no-check bench/micro.ts`.
 */
import { openLibc } from "../ffi/libc.ts";
import { DevicePipe } from "../lib/daemon/pipe.ts";
import { DEFAULT_PARAMS } from "../lib/engine/params.ts";
import { TrackedTarget } from "../lib/ublk/targets/tracked.ts";
import { PassthroughTarget } from "../lib/ublk/targets/passthrough.ts";
import { Waker } from "../lib/ublk/targets/waker.ts";
import { CbtFile } from "../lib/daemon/cbt_file.ts";
import { ImageTarget } from "../lib/ublk/targets/image.ts";
import { newIoRequest, type QueueContext } from "../lib/ublk/target.ts";
import { UBLK_IO_OP } from "../ffi/ublk_abi.ts";

const libc = openLibc();
const depth = 128;
const size = 1 << 30;
const pipe = new DevicePipe(libc, {
  sizeBytes: size,
  minimumIoBytes: 512,
  params: DEFAULT_PARAMS,
  queues: 1,
});
const cbtPath = Deno.makeTempFileSync({ prefix: "micro-cbt-" });
const cbtFile = CbtFile.open(libc, cbtPath, {
  capacitySectors: size / 512,
  params: DEFAULT_PARAMS,
  reuse: false,
});
const filePipe = new DevicePipe(libc, {
  sizeBytes: size,
  minimumIoBytes: 512,
  params: DEFAULT_PARAMS,
  queues: 1,
  cbtFile,
});
const sqeBuf = new ArrayBuffer(128 * 512);
let sqeTail = 0;
const ring = {
  sqeU8: new Uint8Array(sqeBuf),
  sqeU32: new Uint32Array(sqeBuf),
  sqeI32: new Int32Array(sqeBuf),
  setU64(o: number, v: number) {
    this.sqeU32[o >> 2] = v >>> 0;
    this.sqeU32[(o >> 2) + 1] = Math.floor(v / 4294967296);
  },
  prepBuf(write: boolean, fd: number, addr: number, len: number, off: number, ud: number) {
    const o = (sqeTail++ & 511) * 128;
    const u = this.sqeU32;
    for (let i = o >> 2, e = (o + 128) >> 2; i < e; i++) u[i] = 0;
    this.sqeU8[o] = write ? 5 : 4;
    this.sqeI32[(o + 4) >> 2] = fd;
    this.setU64(o + 8, off);
    this.setU64(o + 16, addr);
    u[(o + 24) >> 2] = len;
    u[(o + 32) >> 2] = ud;
    return o;
  },
};
const q = {
  ring,
  qId: 0,
  depth,
  maxIoBufBytes: 1 << 20,
  fileFlags: 1,
  buffer: () => new Uint8Array(0),
  targetSubmitted() {},
  targetFile: () => 1,
  complete() {},
  bufferAddress: (t: number) => 0x7f0000000000 + t * (1 << 20),
  bufferWords: new Int32Array(0),
} as unknown as QueueContext;

function trackedTarget(profile: string, p = pipe): TrackedTarget {
  Deno.env.set("BLKSNAP_PROFILE_WRITE_PATH", profile);
  return new TrackedTarget(
    depth,
    { ...p.shared, storeRing: p.shared.trackedRings[0]! },
    new Waker(libc),
  );
}
const tracked = trackedTarget("");
const nogate = trackedTarget("nogate");
const nomark = trackedTarget("nomark");
const asPass = trackedTarget("pass");
const fileMapped = trackedTarget("", filePipe);
const pass = new PassthroughTarget(depth);
const req = newIoRequest();
let seed = 1;
function rnd() {
  seed = (seed * 1103515245 + 12345) & 0x7fffffff;
  return seed;
}
function run(
  name: string,
  op: number,
  target: { start: typeof pass.start; onCompletion: typeof pass.onCompletion },
  n: number,
) {
  const t0 = performance.now();
  for (let i = 0; i < n; i++) {
    const tag = i & (depth - 1);
    req.tag = tag;
    req.op = op;
    req.flags = 0;
    req.nrSectors = 8;
    req.startSector = (rnd() % (size / 4096)) * 8;
    req.bufAddress = 0x7f0000000000 + tag * (1 << 20);
    target.start(q, req);
    target.onCompletion(q, tag, 0, 4096);
  }
  const ns = ((performance.now() - t0) * 1e6) / n;
  best[name] = Math.min(best[name] ?? Infinity, ns);
}
const best: Record<string, number> = {};
// An image over a second pipe with a take armed: chunks of even 256 KiB
// ranges stay on the original, odd ones are stored in the difference storage.
const imagePipe = new DevicePipe(libc, {
  sizeBytes: size,
  minimumIoBytes: 512,
  params: DEFAULT_PARAMS,
  queues: 1,
});
imagePipe.arm({ fd: -1, storeWakeFd: -1, unitShift: 0 });
for (let n = 1; n < imagePipe.geometry.chunkCount; n += 2) {
  if (!imagePipe.chunks.tryClaim(n, 0)) throw new Error("claim");
  imagePipe.chunks.loaded(n);
  imagePipe.chunks.storing(n, n * 512);
  imagePipe.chunks.stored(n);
}
const image = new ImageTarget(
  depth,
  { ...imagePipe.shared, storeRing: imagePipe.shared.imageRings[0]! },
  new Waker(libc),
);
for (let r = 0; r < 15; r++) {
  run("pass read", UBLK_IO_OP.READ, pass, 500_000);
  run("tracked read", UBLK_IO_OP.READ, tracked, 500_000);
  run("tracked write", UBLK_IO_OP.WRITE, tracked, 500_000);
  run("write, no gate", UBLK_IO_OP.WRITE, nogate, 500_000);
  run("write, no mark", UBLK_IO_OP.WRITE, nomark, 500_000);
  run("write, CBT map in a file", UBLK_IO_OP.WRITE, fileMapped, 500_000);
  run("image read", UBLK_IO_OP.READ, image, 500_000);
  run("write, passed through", UBLK_IO_OP.WRITE, asPass, 500_000);
}
console.log(best);
