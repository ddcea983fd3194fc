// fixtures/dirtywriter driven from a test: its anonymous and shared regions,
// and commands sent through a private FIFO (each answers one JSON line).
import { execFileSync } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Intervals } from '../../core/intervals.js';
import { startDetached, type DetachedFixture } from './spawn.js';

export const PAGE = 4096n;

export interface Writer {
  fixture: DetachedFixture;
  anon: bigint;
  shm: bigint;
  pages: number;
  /** Send one command; rejects unless it answers ok. */
  send(command: string): Promise<Record<string, unknown>>;
  /** Close the FIFO and remove its directory (the fixture is ended by killDetached). */
  close(): void;
}

export async function startWriter(pages = 64): Promise<Writer> {
  const dir = mkdtempSync(join(tmpdir(), 'wpsnap-dirtywriter-'));
  const fifo = join(dir, 'commands');
  execFileSync('mkfifo', ['-m', '0600', fifo]);
  const fixture = await startDetached('dirtywriter', ['-p', String(pages), '-c', fifo]);
  const fd = openSync(fifo, 'w');
  return {
    fixture,
    anon: BigInt(fixture.ready['anon'] as string),
    shm: BigInt(fixture.ready['shm'] as string),
    pages,
    async send(command) {
      writeSync(fd, `${command}\n`);
      const reply = await fixture.nextLine();
      if (reply['ok'] !== true) throw new Error(`dirtywriter: ${command}: ${JSON.stringify(reply)}`);
      return reply;
    },
    close() {
      closeSync(fd);
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Page ranges of `base` as intervals, from [firstPage, count] pairs. */
export function pagesOf(base: bigint, ...runs: Array<[number, number]>): Intervals {
  return runs.map(([p, n]) => [base + BigInt(p) * PAGE, base + BigInt(p + n) * PAGE] as [bigint, bigint]);
}
