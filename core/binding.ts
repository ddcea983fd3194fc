// Loads the native addon. Only the controller layer imports this; everything
// above it receives the binding as a parameter so it can be tested with a fake.
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { WpsnapError } from '../common/errors.js';
import { packageRoot } from '../common/package-root.js';
import type { NativeBinding } from './native/binding.js';

export type { NativeBinding } from './native/binding.js';

let cached: NativeBinding | undefined;

/** Where npm install builds the addon. */
export function nativeAddonPath(): string {
  return join(packageRoot(), 'build', 'Release', 'wpsnap_native.node');
}

/** The tracer helper npm install builds next to the addon (the addon starts it to freeze a target). */
export function tracerHelperPath(): string {
  return join(dirname(nativeAddonPath()), 'wpsnap_tracer');
}

/** The process a restore becomes (core/native/restorer_main.c), built next to the addon. */
export function restorerPath(): string {
  return join(dirname(nativeAddonPath()), 'wpsnap_restorer');
}

export function loadBinding(): NativeBinding {
  if (cached) return cached;
  if (process.platform !== 'linux' || process.arch !== 'x64') {
    throw new WpsnapError('UNSUPPORTED_PLATFORM', `wpsnap needs Linux on x86_64 (this is ${process.platform}/${process.arch})`);
  }
  const path = nativeAddonPath();
  if (!existsSync(path)) {
    throw new WpsnapError('NATIVE_MISSING', `native addon not built: ${path} is missing (run npm install)`);
  }
  cached = createRequire(import.meta.url)(path) as NativeBinding;
  return cached;
}
