/**
 * The kernel module's parameters (DESIGN.md §5), with its defaults. Each is
 * also a `blksnap daemon` option spelled with dashes.
 */
export const PARAMETER_DEFAULTS = {
  tracking_block_minimum_shift: 16,
  tracking_block_maximum_count: 2_097_152,
  tracking_block_maximum_shift: 26,
  chunk_minimum_shift: 18,
  chunk_maximum_count_shift: 40,
  chunk_maximum_shift: 26,
  chunk_maximum_in_queue: 16,
  free_diff_buffer_pool_size: 128,
  diff_storage_minimum: 2_097_152,
} as const;

export type ParameterName = keyof typeof PARAMETER_DEFAULTS;
export type Parameters = Record<ParameterName, number>;
