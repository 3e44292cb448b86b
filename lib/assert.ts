/**
 * Invariant checks. A failed assertion is a bug in this program, never an
 * operating error: it throws an AssertionError that nobody should catch and
 * turn into a reply.
 *
 * On hot paths keep the message a constant: a template literal is built on
 * every call. Where the message needs values, write
 * `if (!cond) unreachable(\`... ${value}\`)`.
 */
export class AssertionError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "AssertionError";
  }
}

export function assert(condition: unknown, message: string): asserts condition {
  if (!condition) throw new AssertionError(message);
}

export function unreachable(message: string): never {
  throw new AssertionError(`unreachable: ${message}`);
}
