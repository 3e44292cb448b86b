/**
 * The io_uring wrapper's fixed buffers on the real kernel: READ_FIXED and
 * WRITE_FIXED (Ring.prepBuf) move the right bytes, on a block device opened
 * O_DIRECT (a loop device) and on a buffered file, and memory outside the registered buffers falls back to the
 * plain opcodes. Runs inside the VM (tools/vm.sh test); it needs FFI.
 */
import { deepStrictEqual as assertEquals, ok as assert, throws } from "node:assert/strict";
import { O, openLibc } from "../../ffi/libc.ts";
import { openLiburing } from "../../ffi/liburing.ts";
import { IORING_OP, SQE } from "../../ffi/uring_abi.ts";
import { addressOf, Ring } from "../../lib/uring/ring.ts";
import { Loop, pseudoRandomBytes, vmTest } from "./_helpers.ts";

const BYTES = 1 << 20;

vmTest("io_uring fixed buffers: READ_FIXED/WRITE_FIXED move the right bytes", async () => {
  const libc = openLibc();
  const uring = openLiburing();
  const loop = await Loop.create(2);
  try {
    for (const direct of [true, false]) {
      const path = direct ? loop.path : loop.file;
      const fd = libc.open(path, O.RDWR | O.CLOEXEC | (direct ? O.DIRECT : 0));
      const ring = new Ring(uring.symbols, libc, { entries: 8 });
      // two buffers: registered [0, 2M) and an unregistered 1M after them
      const mem = libc.alignedAlloc(4096, 3 * BYTES);
      try {
        const base = addressOf(mem);
        const view = new Uint8Array(Deno.UnsafePointerView.getArrayBuffer(mem, 3 * BYTES));
        const data = pseudoRandomBytes(direct ? 7 : 8, BYTES);
        view.set(data, 0);
        ring.registerBuffers([{ address: base, bytes: 2 * BYTES }]);
        throws(
          () => ring.registerBuffers([{ address: base, bytes: BYTES }]),
          /io_uring_register_buffers/,
          "a second registration is refused with a clear error",
        );

        const run = (write: boolean, addr: number, len: number, at: number, opcode: number) => {
          const off = ring.prepBuf(write, fd, addr, len, at, 0x77);
          assertEquals(ring.sqeU8[off + SQE.opcode], opcode);
          ring.submitAndWait(1);
          let res = -1;
          assertEquals(ring.drain((_ud, r) => (res = r)), 1);
          assertEquals(res, len, `${IORING_OP_NAME[opcode]} returned ${res}`);
        };
        // fixed write of the data at file offset 1M, fixed read back into [1M, 2M)
        run(true, base, BYTES, BYTES, IORING_OP.WRITE_FIXED);
        run(false, base + BYTES, BYTES, BYTES, IORING_OP.READ_FIXED);
        assertEquals(view.subarray(BYTES, 2 * BYTES), data);
        // a range that leaves the registered buffer uses the plain opcode
        run(false, base + 2 * BYTES, BYTES, BYTES, IORING_OP.READ);
        assertEquals(view.subarray(2 * BYTES, 3 * BYTES), data);
        run(false, base + BYTES + 4096, BYTES, 0, IORING_OP.READ);
        // an unaligned piece inside the buffer (buffered file only: O_DIRECT needs alignment)
        if (!direct) {
          view.fill(0, 0, 4096);
          run(false, base + 100, 1000, BYTES + 100, IORING_OP.READ_FIXED);
          assertEquals(view.subarray(100, 1100), data.subarray(100, 1100));
        }
        if (direct) libc.check(libc.sym.fsync(fd), "fsync");
        const back = await Deno.readFile(path);
        assertEquals(back.subarray(BYTES, 2 * BYTES), data);
        assert(back.subarray(0, BYTES).every((b) => b === 0), "nothing written elsewhere");
      } finally {
        ring.close();
        libc.free(mem);
        libc.close(fd);
      }
    }
  } finally {
    await loop.destroy();
    uring.close();
  }
});

const IORING_OP_NAME: Record<number, string> = Object.fromEntries(
  Object.entries(IORING_OP).map(([k, v]) => [v, k]),
);
