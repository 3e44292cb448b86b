import {
  deepStrictEqual as assertEquals,
  notStrictEqual as assertNotEquals,
  ok as assert,
  throws as assertThrows,
} from "node:assert/strict";
import { type BufferAllocator, ControlCommands } from "./control_commands.ts";
import { AssertionError } from "../assert.ts";
import { UD_KIND, udKind } from "../uring/user_data.ts";

/** Buffers as Uint8Arrays; remembers which are allocated so a test sees every free. */
class FakeAllocator implements BufferAllocator<Uint8Array> {
  readonly live = new Set<Uint8Array>();
  freed = 0;
  alloc(): Uint8Array {
    const b = new Uint8Array(64);
    this.live.add(b);
    return b;
  }
  free(b: Uint8Array): void {
    assert(this.live.delete(b), "freed a buffer twice or one never allocated");
    this.freed++;
  }
}

Deno.test("ControlCommands: each command gets its own buffer, freed after its answer", () => {
  const mem = new FakeAllocator();
  const cmds = new ControlCommands(mem);
  const a = cmds.begin();
  assertEquals(udKind(a.userData), UD_KIND.CTRL);
  assertEquals(cmds.result(a.userData), undefined);
  assertEquals(cmds.answer(a.userData, 0), "answered");
  assertEquals(cmds.result(a.userData), 0);
  cmds.finish(a.userData);
  assertEquals(mem.live.size, 0);
  const b = cmds.begin();
  assertNotEquals(b.userData, a.userData);
  assertEquals(cmds.live, 1);
});

Deno.test("ControlCommands: a late answer to a timed-out command never touches the next one", () => {
  const mem = new FakeAllocator();
  const cmds = new ControlCommands(mem);
  const slow = cmds.begin();
  cmds.abandon(slow.userData); // the caller timed out
  assertEquals(mem.live.has(slow.buffer), true, "kept while the kernel may write it");
  assertEquals(cmds.abandoned, 1);

  const next = cmds.begin();
  assert(next.buffer !== slow.buffer, "the next command has a buffer of its own");
  next.buffer.fill(0xab); // the next command's payload
  // The kernel answers the slow command now, writing into the buffer it was given.
  slow.buffer.fill(0x11);
  assertEquals(cmds.answer(slow.userData, -110), "late");
  assertEquals(mem.live.has(slow.buffer), false, "freed once its answer came");
  assertEquals(cmds.result(next.userData), undefined, "the late answer is not the next one's");
  assertEquals([...new Set(next.buffer)], [0xab]);

  assertEquals(cmds.answer(next.userData, 0), "answered");
  cmds.finish(next.userData);
  assertEquals(mem.live.size, 0);
  assertEquals(cmds.abandoned, 0);
});

Deno.test("ControlCommands: an answer that matches no command is reported, not applied", () => {
  const mem = new FakeAllocator();
  const cmds = new ControlCommands(mem);
  const a = cmds.begin();
  assertEquals(cmds.answer(a.userData ^ 0x8000, 0), "unknown");
  assertEquals(cmds.result(a.userData), undefined);
});

Deno.test("ControlCommands: abandoning an answered command frees it at once", () => {
  const mem = new FakeAllocator();
  const cmds = new ControlCommands(mem);
  const a = cmds.begin();
  cmds.answer(a.userData, 0);
  cmds.abandon(a.userData);
  assertEquals(mem.live.size, 0);
});

Deno.test("ControlCommands: user_data of an abandoned command is not reused after wrapping", () => {
  const mem = new FakeAllocator();
  const cmds = new ControlCommands(mem);
  const stuck = cmds.begin();
  cmds.abandon(stuck.userData);
  for (let i = 0; i < 0x1_0000 + 5; i++) {
    const c = cmds.begin();
    assertNotEquals(c.userData, stuck.userData);
    cmds.answer(c.userData, 0);
    cmds.finish(c.userData);
  }
  assertEquals(mem.live.size, 1);
  assertEquals(cmds.answer(stuck.userData, 0), "late");
  assertEquals(mem.live.size, 0);
});

Deno.test("ControlCommands.close() frees answered buffers and leaves unanswered ones", () => {
  const mem = new FakeAllocator();
  const cmds = new ControlCommands(mem);
  const answered = cmds.begin();
  cmds.answer(answered.userData, 0);
  const stuck = cmds.begin();
  cmds.abandon(stuck.userData);
  const waiting = cmds.begin();
  assertEquals(cmds.close(), 2);
  assertEquals(mem.live.has(answered.buffer), false);
  assertEquals(mem.live.has(stuck.buffer), true);
  assertEquals(mem.live.has(waiting.buffer), true);
  assertThrows(() => cmds.begin(), AssertionError);
});

Deno.test("ControlCommands: misuse is a bug (assertion), not an operating error", () => {
  const cmds = new ControlCommands(new FakeAllocator());
  const a = cmds.begin();
  cmds.abandon(a.userData);
  assertThrows(() => cmds.finish(a.userData), AssertionError);
  assertThrows(() => cmds.abandon(a.userData), AssertionError);
  const b = cmds.begin();
  cmds.answer(b.userData, 0);
  assertThrows(() => cmds.answer(b.userData, 0), AssertionError);
});
