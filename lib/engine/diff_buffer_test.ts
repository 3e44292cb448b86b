import { assertEquals, assertThrows, assertTrue } from "./_assert.ts";
import { DiffBufferPool } from "./diff_buffer.ts";
import { AssertionError } from "./errors.ts";

Deno.test("DiffBufferPool makes buffers lazily: an idle pool holds no buffer memory", () => {
  const pool = new DiffBufferPool({ bufferBytes: 4096, maximumBuffers: 128 });
  assertEquals(pool.shared.byteLength, 0);
  assertEquals(pool.made, 0);
  assertEquals(pool.available, 128);
  const index = pool.take();
  assertEquals(index, 0);
  assertEquals(pool.shared.byteLength, 4096);
  assertEquals(pool.view(index).length, 4096);
});

Deno.test("DiffBufferPool.take() returns -1 when every buffer is taken, never growing more", () => {
  const pool = new DiffBufferPool({ bufferBytes: 512, maximumBuffers: 3 });
  assertEquals([pool.take(), pool.take(), pool.take()], [0, 1, 2]);
  assertEquals(pool.take(), -1);
  assertEquals(pool.available, 0);
  assertEquals(pool.shared.byteLength, 3 * 512);
});

Deno.test("DiffBufferPool reuses released buffers before making new ones", () => {
  const pool = new DiffBufferPool({ bufferBytes: 512, maximumBuffers: 4 });
  const a = pool.take();
  const b = pool.take();
  pool.view(a).fill(7);
  pool.release(a);
  assertEquals(pool.inUse, 1);
  assertEquals(pool.take(), a);
  assertEquals(pool.made, 2);
  pool.release(b);
  assertEquals(pool.inUse, 1);
});

Deno.test("DiffBufferPool asserts a double release and views of free buffers", () => {
  const pool = new DiffBufferPool({ bufferBytes: 512, maximumBuffers: 2 });
  const a = pool.take();
  pool.release(a);
  assertThrows(() => pool.release(a), AssertionError, "released twice");
  assertThrows(() => pool.view(a), AssertionError, "not taken");
  assertThrows(() => pool.release(5), AssertionError);
});

Deno.test("DiffBufferPool.view() hands out one view per buffer, made once", () => {
  const pool = new DiffBufferPool({ bufferBytes: 4096, maximumBuffers: 2 });
  const index = pool.take();
  const view = pool.view(index);
  assertTrue(pool.view(index) === view, "no new Uint8Array per call");
  assertEquals(pool.view(index, 512).length, 512);
  assertTrue(pool.view(index, 512).buffer === view.buffer);
});
