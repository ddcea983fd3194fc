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
    // The test targets write at full speed on both CPUs of this machine: at
    // the CLI's default idle priority their snapshots' stores would wait for
    // them to stop. test/impact.test.ts runs idle and nice explicitly.
    env: { WPSNAP_PRIORITY: 'normal' },
  },
});
