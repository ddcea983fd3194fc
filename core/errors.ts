// The controller's errors are the shared ones (common/errors.ts).
export * from '../common/errors.js';
