// The page store's public surface.
export { resolveStorePath } from './location.js';
export { Store, SnapshotWriter, type StoreOpenOptions, type WriterCounters, type WriterStats } from './store.js';
export { MIGRATIONS, APPLICATION_ID, type Migration } from './schema.js';
