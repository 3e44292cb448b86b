/**
 * The demo (README's main job): attach a loop device, make ext4 on the
 * tracked device, write files, take a snapshot, change the files, show the
 * snapshot image with the old checksums, destroy it, detach, and show the
 * new files on the original. Needs root and ublk_drv; tools/dev.sh
 * runs it in the VM when this host has no ublk.
 */
const ROOT = new URL("../", import.meta.url).pathname;
const SOCKET = "/run/blksnap-demo/control.sock";

const dec = new TextDecoder();

async function run(cmd: string, ...args: string[]): Promise<string> {
  const out = await new Deno.Command(cmd, {
    args,
    env: { BLKSNAP_SOCKET: SOCKET },
    stdout: "piped",
    stderr: "piped",
  }).output();
  const stderr = dec.decode(out.stderr).trim();
  if (stderr) console.log(stderr.split("\n").map((l) => `    ${l}`).join("\n"));
  if (out.code !== 0) throw new Error(`${cmd} ${args.join(" ")} exited ${out.code}`);
  return dec.decode(out.stdout).trim();
}

function step(text: string): void {
  console.log(`\n==> ${text}`);
}

async function blksnap(...args: string[]): Promise<string> {
  console.log(`  $ blksnap ${args.join(" ")}`);
  const out = await run(Deno.execPath(), "run", "-A", "--quiet", `${ROOT}main.ts`, ...args);
  if (out) console.log(out.split("\n").map((l) => `  ${l}`).join("\n"));
  return out;
}

async function sha256(path: string): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", await Deno.readFile(path));
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

async function writeFiles(
  dir: string,
  prefix: string,
  count: number,
): Promise<Map<string, string>> {
  const sums = new Map<string, string>();
  for (let i = 0; i < count; i++) {
    const data = crypto.getRandomValues(new Uint8Array(65536)); // 64 KiB, the API's limit
    const parts = Array.from({ length: 1 + i * 4 }, () => data);
    const name = `${prefix}-${i}.bin`;
    await Deno.writeFile(`${dir}/${name}`, new Uint8Array(await new Blob(parts).arrayBuffer()));
    sums.set(name, await sha256(`${dir}/${name}`));
    console.log(`  ${sums.get(name)}  ${name}`);
  }
  return sums;
}

/** Compares checksums; returns how many differ. */
async function compare(dir: string, sums: Map<string, string>): Promise<number> {
  let bad = 0;
  for (const [name, sum] of sums) {
    const now = await sha256(`${dir}/${name}`).catch(() => "(missing)");
    const ok = now === sum;
    if (!ok) bad++;
    console.log(`  ${ok ? "ok  " : "FAIL"} ${now}  ${name}`);
  }
  return bad;
}

async function main(): Promise<number> {
  step("make a 256 MiB disk: a loop device over a file");
  await Deno.mkdir("/tmp/blksnap-demo/diff", { recursive: true });
  const image = "/tmp/blksnap-demo/disk.img";
  await Deno.writeFile(image, new Uint8Array(0));
  await Deno.truncate(image, 256 << 20);
  const loop = await run("losetup", "--find", "--show", image);
  console.log(`  ${loop}`);
  const mnt = "/tmp/blksnap-demo/mnt";
  const snapMnt = "/tmp/blksnap-demo/snap";
  await Deno.mkdir(mnt, { recursive: true });
  await Deno.mkdir(snapMnt, { recursive: true });
  let tracked = "";
  let id = "";
  let bad = 0;
  try {
    step(`attach ${loop}: blksnap creates the tracked device`);
    tracked = await blksnap("attach", "--device", loop);

    step(`make ext4 on ${tracked}, mount it, write files`);
    await run("mkfs.ext4", "-q", "-F", "-L", "demo", tracked);
    await run("mount", tracked, mnt);
    const before = await writeFiles(mnt, "before", 6);

    step("snapshot it: difference storage in a directory (an unnamed file), limit 128 MiB");
    id = await blksnap(
      "snapshot_create",
      "--device",
      loop,
      "--file",
      "/tmp/blksnap-demo/diff",
      "--limit",
      "128M",
    );
    await blksnap("snapshot_take", "--id", id);
    const snapImage = await blksnap("snapshot_info", "--device", loop, "--field", "image");
    await blksnap("cbtinfo", "--device", loop);

    step("change the live filesystem: overwrite the old files, add new ones");
    const after = await writeFiles(mnt, "before", 6);
    for (const [k, v] of await writeFiles(mnt, "after", 3)) after.set(k, v);
    await run("sync");

    step(`mount the snapshot image ${snapImage}: it shows the files as they were`);
    await run("mount", "-o", "ro", snapImage, snapMnt);
    bad += await compare(snapMnt, before);
    await run("umount", snapMnt);
    await blksnap("status");

    step("destroy the snapshot, unmount, detach");
    await blksnap("snapshot_destroy", "--id", id);
    id = "";
    await run("umount", mnt);
    await blksnap("detach", "--device", loop);
    tracked = "";

    step(`mount the original ${loop} read-only: it holds the files from after the snapshot`);
    await run("mount", "-o", "ro", loop, mnt);
    bad += await compare(mnt, after);
    await run("umount", mnt);
    console.log(bad === 0 ? "\nAll checksums match." : `\n${bad} checksum(s) differ.`);
    return bad === 0 ? 0 : 1;
  } finally {
    await run("umount", snapMnt).catch(() => {});
    if (id) await blksnap("snapshot_destroy", "--id", id).catch(() => {});
    await run("umount", mnt).catch(() => {});
    if (tracked) await blksnap("detach", "--device", loop).catch(() => {});
    const st = JSON.parse(
      await run(Deno.execPath(), "run", "-A", "--quiet", `${ROOT}main.ts`, "status", "--json"),
    );
    if (st.pid) Deno.kill(st.pid, "SIGTERM");
    await run("losetup", "-d", loop).catch(() => {});
  }
}

if (import.meta.main) Deno.exit(await main());
