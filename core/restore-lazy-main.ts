// The background page server of `restore --lazy --detach`: started by
// restoreLazy with the restored process's userfaultfd as fd 3 and the
// guardian's control socket as fd 4; serves every page, tells the guardian
// "served", exits. If it dies first, the guardian kills the process.
import { writeSync, closeSync } from 'node:fs';
import { Store } from '../store/store.js';
import { loadBinding } from './binding.js';
import { servePages } from './restore-lazy.js';
import type { RegionRecord } from '../snapshot-format/model.js';

const UFFD_FD = 3;
const CONTROL_FD = 4;

async function main(): Promise<void> {
  const [storePath, processId, pid, regionsJson] = process.argv.slice(2);
  const regions = (JSON.parse(regionsJson!) as Array<[string, string]>).map(([start, end]) => ({ start: BigInt(start), end: BigInt(end) }) as RegionRecord);
  const store = Store.open(storePath!, { readonly: true });
  try {
    await servePages(loadBinding(), store, { pid: Number(pid), uffd: UFFD_FD, processId: Number(processId), regions });
  } finally {
    await store.close();
  }
  writeSync(CONTROL_FD, 'served\n');
  closeSync(CONTROL_FD);
  closeSync(UFFD_FD);
}

main().catch((error: unknown) => {
  process.stderr.write(`wpsnap page server: ${(error as Error).message}\n`);
  process.exit(1);
});
