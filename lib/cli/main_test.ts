import { deepStrictEqual as assertEquals, match as assertMatch } from "node:assert/strict";
import { main } from "./main.ts";
import { VERSION } from "../version.ts";

/** Runs the CLI in-process against a socket nobody listens on. */
async function cli(...argv: string[]): Promise<{ code: number; out: string; err: string }> {
  const out: string[] = [];
  const err: string[] = [];
  const { log, error } = console;
  console.log = (...a: unknown[]) => out.push(a.join(" "));
  console.error = (...a: unknown[]) => err.push(a.join(" "));
  const dir = Deno.makeTempDirSync();
  Deno.env.set("BLKSNAP_SOCKET", `${dir}/none.sock`);
  try {
    const code = await main(argv);
    return { code, out: out.join("\n"), err: err.join("\n") };
  } finally {
    console.log = log;
    console.error = error;
    Deno.env.delete("BLKSNAP_SOCKET");
    Deno.removeSync(dir, { recursive: true });
  }
}

Deno.test("blksnap version prints major.minor.revision.build, --json adds details", async () => {
  assertEquals(await cli("version"), { code: 0, out: VERSION, err: "" });
  const j = await cli("version", "--json");
  assertEquals(JSON.parse(j.out).version, VERSION);
});

Deno.test("blksnap help, --help and COMMAND --help print usage and exit 0", async () => {
  assertMatch((await cli("help")).out, /Commands:\n {2}version/);
  assertMatch((await cli("help", "attach")).out, /Usage: blksnap attach --device DEVICE/);
  assertMatch((await cli("attach", "--help")).out, /Usage: blksnap attach/);
  assertMatch((await cli("daemon", "-h")).out, /--diff-storage-minimum=2097152/);
  assertEquals((await cli("help", "nope")).code, 2);
});

Deno.test("bad command lines exit 2 with a message naming the problem", async () => {
  const cases: Array<[string[], RegExp]> = [
    [["frob"], /Unknown command "frob"/],
    [["attach"], /attach: --device is required/],
    [["attach", "--device"], /argument missing/],
    [["attach", "--nope"], /Unknown option '--nope'/],
    [["attach", "-d", "/dev/x", "extra"], /unexpected argument "extra"/],
    [["detach", "--device="], /--device is required/],
    [["daemon", "--queues", "zero"], /--queues must be a whole number/],
    [["daemon", "--queue-depth", "5000"], /--queue-depth must be between 1 and 4096/],
  ];
  for (const [argv, re] of cases) {
    const r = await cli(...argv);
    assertEquals(r.code, 2, argv.join(" "));
    assertMatch(r.err, re);
  }
});

Deno.test("--json errors are one JSON document on stdout too", async () => {
  const r = await cli("frob", "--json");
  assertEquals(JSON.parse(r.out).error.code, "EINVAL");
});

Deno.test("status without a daemon says so and exits 0; detach exits 3", async () => {
  const s = await cli("status");
  assertEquals(s.code, 0);
  assertMatch(s.out, /daemon: not running/);
  assertEquals(JSON.parse((await cli("status", "--json")).out), { running: false, devices: [] });
  const d = await cli("detach", "--device", "/dev/loop0");
  assertEquals(d.code, 3);
  assertMatch(d.err, /No blksnap daemon answers on/);
});
