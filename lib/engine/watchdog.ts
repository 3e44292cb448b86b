/**
 * A one-shot timer that is either armed or not: the stall watchdog of the
 * diff area and of the difference storage (`cow_stall_timeout_ms`). Arming an
 * armed watchdog keeps the earlier deadline; the check re-arms it when it
 * finds progress.
 *
 * @module
 */
export class Watchdog {
  readonly #check: () => void;
  #timer: ReturnType<typeof setTimeout> | undefined;
  readonly #fire = () => {
    this.#timer = undefined;
    this.#check();
  };

  /** `check` runs when the timer fires, with the watchdog already disarmed. */
  constructor(check: () => void) {
    this.#check = check;
  }

  get armed(): boolean {
    return this.#timer !== undefined;
  }

  arm(delayMs: number): void {
    if (this.#timer !== undefined) return;
    this.#timer = setTimeout(this.#fire, Math.max(1, Math.ceil(delayMs)));
  }

  stop(): void {
    if (this.#timer === undefined) return;
    clearTimeout(this.#timer);
    this.#timer = undefined;
  }
}
