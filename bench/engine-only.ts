// wpsnap's snapshot with the store replaced by a sink that drops every batch
// as soon as it arrives: the same attach, pause, native engine (faults first,
// sweep between them) and detach as `wpsnap snapshot`, without hashing, zstd
// or SQLite. Its duration against the full command's tells how much of the
// wall time is the store pipeline. Runs in this process (the target is not
// our child: it was launched re-parented to init).
import { loadBinding } from '../core/binding.js';
import { snapshotProcess, type SnapshotResult } from '../core/snapshot.js';
import type { Store } from '../store/store.js';

export interface EngineOnlyResult {
  pauseMicros: number;
  durationMillis: number;
  bytesCopied: number;
  faults: number;
  faultP50Micros: number;
  faultP99Micros: number;
  lostPages: number;
  engine: SnapshotResult['engine'];
}

/**
 * Just enough of Store/SnapshotWriter for snapshotProcess, keeping nothing.
 * Methods it does not know (the writer grows) are no-ops returning undefined.
 */
function nullStore(): Store {
  let pages = 0;
  const known: Record<string, unknown> = {
    id: 0,
    addProcess: () => 1,
    addPages: (_processId: number, batch: { addresses: BigUint64Array }) => {
      pages += batch.addresses.length;
      return Promise.resolve();
    },
    complete: () => Promise.resolve({ pagesSaved: pages, zeroPages: 0, pagesNew: pages, bytesRaw: pages * 4096, bytesStored: 0 }),
    abort: () => Promise.resolve(),
  };
  const writer = new Proxy(known, {
    get: (target, key) => (typeof key === 'string' && key in target ? target[key] : () => undefined),
  });
  return { beginSnapshot: () => writer } as unknown as Store;
}

export async function snapshotEngineOnly(pid: number, rateBytesPerSec = 0): Promise<EngineOnlyResult> {
  const r = await snapshotProcess(loadBinding(), nullStore(), pid, rateBytesPerSec > 0 ? { rateBytesPerSec } : {});
  return {
    pauseMicros: r.pauseMicros,
    durationMillis: r.durationMillis,
    bytesCopied: r.engine.bytesCopied,
    faults: r.faults,
    faultP50Micros: r.faultP50Micros,
    faultP99Micros: r.faultP99Micros,
    lostPages: r.lostPages.reduce((n, l) => n + l.pages, 0),
    engine: r.engine,
  };
}
