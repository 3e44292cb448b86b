/**
 * The dependency rules of the layout, checked on the source text:
 *
 * - ffi/ imports nothing from lib/; ffi/errno.ts (errno and the error
 *   classes) imports nothing at all: it is the bottom of the graph.
 * - the engine (lib/engine/) uses no FFI: of ffi/ it imports only errno.ts.
 * - production code (everything main.ts and the worker entry points reach)
 *   imports no test helper.
 * - the CLI talks to the daemon through the protocol and the client only
 *   (lib/backup/, the backup points on disk, is no part of the daemon);
 *   `blksnap daemon` (daemon_cmd.ts) is the daemon itself and may start it.
 * - no raw errno number is passed to ErrnoError or put in a reply.
 */
import { deepStrictEqual as assertEquals, ok as assert } from "node:assert/strict";
import { dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../..");

function sources(dir: string): string[] {
  const out: string[] = [];
  for (const e of Deno.readDirSync(join(ROOT, dir))) {
    const path = `${dir}/${e.name}`;
    if (e.isDirectory) out.push(...sources(path));
    else if (e.name.endsWith(".ts")) out.push(path);
  }
  return out.sort();
}

/** Repository-relative paths of the modules `file` imports (static, re-exports, workers). */
function importsOf(file: string): string[] {
  const text = Deno.readTextFileSync(join(ROOT, file));
  const specs = [
    ...text.matchAll(/^\s*(?:import|export)\b[^;]*?\bfrom\s*"([^"]+)"/gms),
    ...text.matchAll(/^\s*import\s*"([^"]+)"/gm),
    ...text.matchAll(/new URL\(\s*"([^"]+\.ts)",\s*import\.meta\.url\)/g),
  ].map((m) => m[1]!);
  return specs.filter((s) => s.startsWith(".")).map((s) =>
    relative(ROOT, resolve(ROOT, dirname(file), s))
  );
}

function isTestCode(path: string): boolean {
  return path.startsWith("tests/") || path.endsWith("_test.ts") ||
    /(^|\/)_test_util\.ts$/.test(path);
}

/** Every module reachable from the program's entry points. */
function reachable(): Set<string> {
  const seen = new Set<string>();
  const todo = ["main.ts", ...sources("workers")];
  while (todo.length > 0) {
    const f = todo.pop()!;
    if (seen.has(f)) continue;
    seen.add(f);
    todo.push(...importsOf(f));
  }
  return seen;
}

/**
 * Production code: every module of lib/, ffi/ and workers/ that is not a test
 * or a private (`_`-prefixed) helper that only tests reach.
 */
function production(): string[] {
  const live = reachable();
  return ["main.ts", ...sources("lib"), ...sources("ffi"), ...sources("workers")].filter((f) =>
    !isTestCode(f) && (live.has(f) || !/(^|\/)_[^/]*$/.test(f))
  );
}

Deno.test("ffi/ imports nothing from lib/, and ffi/errno.ts imports nothing", () => {
  const upward = sources("ffi").flatMap((f) =>
    importsOf(f).filter((i) => !i.startsWith("ffi/")).map((i) => `${f} -> ${i}`)
  );
  assertEquals(upward, []);
  assertEquals(importsOf("ffi/errno.ts"), []);
});

Deno.test("the engine imports of ffi/ only errno.ts", () => {
  const ffi = sources("lib/engine").flatMap((f) =>
    importsOf(f).filter((i) => i.startsWith("ffi/") && i !== "ffi/errno.ts").map((i) =>
      `${f} -> ${i}`
    )
  );
  assertEquals(ffi, []);
});

Deno.test("production code imports no test helper", () => {
  const prod = production();
  assert(prod.includes("lib/daemon/daemon.ts") && prod.includes("lib/ublk/queue.ts"));
  const bad = prod.flatMap((f) =>
    importsOf(f).filter((i) => isTestCode(i) || !prod.includes(i)).map((i) => `${f} -> ${i}`)
  );
  assertEquals(bad, []);
});

Deno.test("the CLI reaches the daemon only through the protocol and the client", () => {
  const allowed = new Set(["lib/daemon/protocol.ts", "lib/daemon/client.ts"]);
  const bad = sources("lib/cli").filter((f) => !isTestCode(f) && f !== "lib/cli/daemon_cmd.ts")
    .flatMap((f) =>
      importsOf(f).filter((
        i,
      ) => (i.startsWith("lib/") && !i.startsWith("lib/cli/") && !allowed.has(i) &&
        // lib/backup/ (backup points on disk) is no part of the daemon
        !i.startsWith("lib/backup/") && i !== "lib/dev_t.ts" && i !== "lib/version.ts")
      ).map((i) => `${f} -> ${i}`)
    );
  assertEquals(bad, []);
});

Deno.test("no raw errno numbers where ffi/errno.ts has names", () => {
  const raw: string[] = [];
  for (const f of [...sources("lib"), ...sources("ffi")]) {
    if (isTestCode(f)) continue;
    const text = Deno.readTextFileSync(join(ROOT, f));
    for (const m of text.matchAll(/new ErrnoError\([^;]*?,\s*-?\d+\s*[,)]|\berrno:\s*\d+/g)) {
      raw.push(`${f}: ${m[0]}`);
    }
  }
  assertEquals(raw, []);
});

/** Files being changed on another branch; their citations move to docs/ublk.md with that change. */
const CITATIONS_PENDING = new Set<string>();

Deno.test("comments cite documents in the repository, not research/ or DESIGN.md", () => {
  const outside: string[] = [];
  const missing: string[] = [];
  const files = [...sources("lib"), ...sources("ffi"), ...sources("workers"), ...sources("tests")];
  for (const f of files) {
    if (f === "tests/unit/layering_test.ts") continue;
    const text = Deno.readTextFileSync(join(ROOT, f));
    if (!CITATIONS_PENDING.has(f)) {
      for (const m of text.matchAll(/\b(?:research\/\w+\.md|DESIGN\.md)/g)) {
        outside.push(`${f}: ${m[0]}`);
      }
    }
    for (const m of text.matchAll(/\bdocs\/[\w.]+\.md/g)) {
      try {
        Deno.statSync(join(ROOT, m[0]));
      } catch {
        missing.push(`${f}: ${m[0]}`);
      }
    }
  }
  assertEquals(outside, []);
  assertEquals(missing, []);
});
