import { defineConfig } from 'vitest/config';

// Test files run one at a time: they freeze real processes and measure them on
// a 2-core machine, and parallel files would disturb each other's timing.
export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    fileParallelism: false,
    testTimeout: 120_000,
    hookTimeout: 60_000,
    reporters: ['default'],
    pool: 'forks',
  },
});
