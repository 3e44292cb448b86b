/**
 * Loading shared libraries: try each candidate path in turn and, when all fail,
 * say which paths were tried and which environment variable overrides them.
 */

export function dlopenFirst<S extends Deno.ForeignLibraryInterface>(
  what: string,
  overrideEnv: string,
  candidates: readonly string[],
  symbols: S,
): Deno.DynamicLibrary<S> {
  const override = readEnv(overrideEnv);
  const paths = override ? [override] : candidates;
  const failures: string[] = [];
  for (const path of paths) {
    try {
      return Deno.dlopen(path, symbols);
    } catch (err) {
      failures.push(`  ${path}: ${err instanceof Error ? err.message : String(err)}`);
    }
  }
  throw new Error(
    `Cannot load ${what}; tried:\n${failures.join("\n")}\n` +
      `Install it (Debian: ${what}) or set ${overrideEnv} to its path.`,
  );
}

function readEnv(name: string): string | undefined {
  try {
    return Deno.env.get(name) || undefined;
  } catch {
    return undefined; // no --allow-env: use the defaults
  }
}
