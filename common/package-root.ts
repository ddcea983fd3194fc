// The package's root directory: the nearest directory above this file holding
// package.json. The addons and the fixtures are built under it.
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export function packageRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  while (!existsSync(join(dir, 'package.json'))) {
    const parent = dirname(dir);
    if (parent === dir) throw new Error('wpsnap: package.json not found above ' + fileURLToPath(import.meta.url));
    dir = parent;
  }
  return dir;
}
