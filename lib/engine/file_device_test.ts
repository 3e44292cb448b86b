import { assertEquals, assertErrno } from "./_assert.ts";
import { BlksnapError } from "./errors.ts";
import { FileDevice } from "./file_device.ts";
import { filled, Gate, tempDir, yieldTurns } from "./_test_util.ts";

Deno.test("FileDevice writes and reads sectors of its file", async () => {
  await using dir = await tempDir();
  using device = await FileDevice.open({ path: `${dir.path}/dev.img`, sizeBytes: 8192 });
  assertEquals(device.sizeSectors, 16);
  assertEquals(device.deviceId, `file:${dir.path}/dev.img`);
  await device.write(3, filled(1024, 9));
  const out = new Uint8Array(2048);
  await device.read(2, out);
  assertEquals([out[0], out[512], out[1535], out[1536]], [0, 9, 9, 0]);
  assertEquals(device.stats.writes, 1);
  assertEquals((await Deno.stat(`${dir.path}/dev.img`)).size, 8192);
});

Deno.test("FileDevice.discard() zero-fills the range", async () => {
  await using dir = await tempDir();
  using device = await FileDevice.open({ path: `${dir.path}/dev.img`, sizeBytes: 4096 });
  await device.write(0, filled(4096, 1));
  await device.discard(1, 2);
  const out = new Uint8Array(4096);
  device.readSync(0, out);
  assertEquals([out[511], out[512], out[1535], out[1536]], [1, 0, 0, 1]);
});

Deno.test("FileDevice hooks can hold an I/O and inject a fault", async () => {
  await using dir = await tempDir();
  using device = await FileDevice.open({ path: `${dir.path}/dev.img`, sizeBytes: 4096 });
  const gate = new Gate();
  device.hooks = {
    async before(request) {
      if (request.kind === "write") await gate.wait();
      if (request.kind === "flush") throw new BlksnapError("EIO", "injected");
    },
  };
  const writing = device.write(0, filled(512, 5));
  const out = new Uint8Array(512);
  await device.read(0, out);
  assertEquals(out[0], 0, "the write is still held");
  gate.open();
  await writing;
  await device.read(0, out);
  assertEquals(out[0], 5);
  await assertErrno(() => device.flush(), "EIO");
});

Deno.test("FileDevice refuses I/O once closed", async () => {
  await using dir = await tempDir();
  const device = await FileDevice.open({ path: `${dir.path}/dev.img`, sizeBytes: 4096 });
  device.close();
  await assertErrno(() => device.read(0, new Uint8Array(512)), "ENODEV");
});

Deno.test("FileDevice in pieces: a read overlapping a write in flight sees part of it", async () => {
  await using dir = await tempDir();
  const gate = new Gate();
  const seen: string[] = [];
  using device = await FileDevice.open({
    path: `${dir.path}/dev.img`,
    sizeBytes: 8192,
    pieceSectors: 2,
    hooks: {
      async before(request) {
        seen.push(`${request.kind}@${request.offsetBytes}+${request.lengthBytes}`);
        if (request.kind === "write" && request.offsetBytes === 1024) await gate.wait();
      },
      after: () => Promise.resolve(),
    },
  });
  const writing = device.write(0, filled(4096, 7)); // held after its first piece
  await yieldTurns(1);
  const out = new Uint8Array(4096);
  await device.read(0, out);
  assertEquals(out.subarray(0, 1024), filled(1024, 7), "the piece written");
  assertEquals(out.subarray(1024), new Uint8Array(3072), "the pieces not yet written");
  gate.open();
  await writing;
  assertEquals(seen.slice(0, 2), ["write@0+1024", "write@1024+1024"]);
  assertEquals(device.stats.writes, 1, "one write, in four pieces");
});

Deno.test("FileDevice runs the after hook once the data moved, before the I/O completes", async () => {
  await using dir = await tempDir();
  const gate = new Gate();
  using device = await FileDevice.open({
    path: `${dir.path}/dev.img`,
    sizeBytes: 4096,
    hooks: { after: (request) => request.kind === "write" ? gate.wait() : undefined },
  });
  let done = false;
  const writing = device.write(0, filled(512, 3)).then(() => done = true);
  await yieldTurns(1);
  const now = new Uint8Array(512);
  device.readSync(0, now);
  assertEquals([now[0], done], [3, false]);
  gate.open();
  await writing;
});
