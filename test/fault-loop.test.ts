// core/native/fault_loop.c is the userfaultfd loop every owner of a
// userfaultfd shares (the snapshot engine now; dirty tracking and the lazy
// restore page server next). This drives it from an owner that is not the
// engine: test/native/fault_loop_test.c, a page server over two userfaultfds
// (one per half of a region, as a group's controller holds one per process)
// that fills MISSING faults with UFFDIO_COPY on first touch while the region is
// partly discarded (MADV_DONTNEED: REMOVE events) and touched again. Real
// kernel, real faults; the program checks every page's content itself.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { packageRoot } from '../common/package-root.js';

let dir: string;
let program: string;

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'wpsnap-fault-loop-'));
  program = join(dir, 'fault_loop_test');
  const root = packageRoot();
  execFileSync('gcc', [
    '-std=gnu11', '-O2', '-Wall', '-Wextra', '-Werror',
    '-I', join(root, 'core/native'),
    join(root, 'core/native/fault_loop.c'), join(root, 'test/native/fault_loop_test.c'),
    '-o', program, '-lpthread',
  ]);
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('the fault loop, for an owner other than the snapshot engine', () => {
  it('serves every fault once per population, applies each REMOVE before the faults after it, and ends when the work is done', () => {
    const out = execFileSync(program, { encoding: 'utf8', timeout: 20_000 });
    expect(JSON.parse(out)).toEqual({
      ok: true,
      done: true,
      faults: 256 + 64, // every page once, the 64 discarded ones twice
      events: 2, // one REMOVE from each userfaultfd: the discarded range spans both halves
      removedPages: 64,
      wrongPages: 0,
      unservedPages: 0,
      orderErrors: 0,
      sourceErrors: 0,
      error: '',
    });
  });
});
