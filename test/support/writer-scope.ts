// What the dirtywriter-driven test files share: per test a scratch directory
// with a store in it, the dirtywriter targets started (closed and killed
// after the test), and the CLI run with --json on that store.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, expect } from 'vitest';
import { runCli } from './cli.js';
import { startWriter, type Writer } from './dirtywriter.js';
import { killDetached } from './spawn.js';

export interface WriterScope {
  /** This test's scratch directory and store (set before each test). */
  dir: string;
  store: string;
  /** Run after the test, last registered first. */
  readonly cleanups: Array<() => void>;
  writer(pages?: number): Promise<Writer>;
  /** `wpsnap ARGV --json --store STORE`, which must succeed silently: its JSON. */
  cli(...argv: string[]): Promise<Record<string, unknown>>;
}

/** Registers the test file's beforeEach/afterEach; call at the top of the file. */
export function writerScope(prefix: string): WriterScope {
  const scope: WriterScope = {
    dir: '',
    store: '',
    cleanups: [],
    async writer(pages = 64) {
      const w = await startWriter(pages);
      scope.cleanups.push(() => w.close());
      return w;
    },
    async cli(...argv) {
      const run = await runCli([...argv, '--json', '--store', scope.store]);
      expect(run.stderr).toBe('');
      expect(run.code).toBe(0);
      return JSON.parse(run.stdout) as Record<string, unknown>;
    },
  };
  beforeEach(() => {
    scope.dir = mkdtempSync(join(tmpdir(), prefix));
    scope.store = join(scope.dir, 'store.db');
  });
  afterEach(() => {
    while (scope.cleanups.length) scope.cleanups.pop()!();
    killDetached();
    rmSync(scope.dir, { recursive: true, force: true });
  });
  return scope;
}
