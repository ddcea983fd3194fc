// Reading a snapshot's pages in address order through one pass of
// pagesInRange, instead of a lookup per page: the demo's oracle reads each
// writer region front to back, and readPage() per page cost ~6 s of a 20 s demo.
import { PAGE_SIZE } from '../snapshot-format/model.js';
import type { Store } from '../store/store.js';

const ZERO_PAGE = Buffer.alloc(PAGE_SIZE);

/** readPage(address) for mostly ascending addresses; a step back starts a new pass from there. */
export function sequentialPageReader(store: Store, processId: number): (address: bigint) => Buffer {
  let pages: Iterator<{ address: bigint; data: Buffer }> | undefined;
  let next: { address: bigint; data: Buffer } | undefined;
  let last = -1n;
  return (address) => {
    if (pages === undefined || address <= last) {
      pages = store.pagesInRange(processId, address, 1n << 64n)[Symbol.iterator]();
      next = pages.next().value ?? undefined;
    }
    last = address;
    while (next !== undefined && next.address < address) next = pages.next().value ?? undefined;
    return next !== undefined && next.address === address ? next.data : ZERO_PAGE;
  };
}
