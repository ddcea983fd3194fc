// The layers import downward only (DESIGN.md, "Layout"): cli/ → core/ →
// store/ → snapshot-format/, any of them → common/ (the leaf of shared
// vocabulary, which imports nothing of the project), and no product code
// imports fixtures/, test/ or bench/. Only core/ loads the wpsnap addon.
// Every relative import of every product file is read; an arrow that points
// up or sideways fails with the file and the import.
import { readdirSync, readFileSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';

const ROOT = resolve(fileURLToPath(new URL('../..', import.meta.url)));

/** What each top-level directory may import, besides itself. */
const ALLOWED: Record<string, string[]> = {
  common: [],
  'snapshot-format': ['common'],
  store: ['common', 'snapshot-format'],
  core: ['common', 'snapshot-format', 'store'],
  cli: ['common', 'snapshot-format', 'store', 'core'],
};

function sources(dir: string): string[] {
  return readdirSync(join(ROOT, dir), { withFileTypes: true, recursive: true })
    .filter((e) => e.isFile() && e.name.endsWith('.ts') && !e.name.endsWith('.d.ts'))
    .map((e) => relative(ROOT, join(e.parentPath, e.name)));
}

/** The module specifiers a file imports or re-exports (static and dynamic). */
export function importsOf(text: string): string[] {
  const specifiers: string[] = [];
  const patterns = [/^\s*(?:import|export)\s[^'"]*?\sfrom\s+['"]([^'"]+)['"]/gm, /^\s*import\s+['"]([^'"]+)['"]/gm, /\bimport\(\s*['"]([^'"]+)['"]\s*\)/g];
  for (const pattern of patterns) for (const m of text.matchAll(pattern)) specifiers.push(m[1]!);
  return specifiers;
}

function layerOf(path: string): string {
  return path.split('/')[0]!;
}

function violations(): string[] {
  const found: string[] = [];
  for (const layer of Object.keys(ALLOWED)) {
    for (const file of sources(layer)) {
      const text = readFileSync(join(ROOT, file), 'utf8');
      for (const specifier of importsOf(text)) {
        if (!specifier.startsWith('.')) continue;
        const target = relative(ROOT, resolve(ROOT, dirname(file), specifier));
        const targetLayer = layerOf(target);
        if (targetLayer === layer) continue;
        if (!ALLOWED[layer]!.includes(targetLayer)) found.push(`${file} imports ${specifier} (${layer} → ${targetLayer})`);
      }
      // Only the controller loads its addon (by path, through core/binding.ts).
      if (layer !== 'core' && /wpsnap_native|wpsnap_tracer/.test(text)) found.push(`${file} names the controller's addon`);
    }
  }
  return found;
}

describe('layering', () => {
  it('every import of cli/, core/, store/, snapshot-format/ and common/ points down', () => {
    expect(violations()).toEqual([]);
  });

  it('the import reader sees every form an import takes (so the check above cannot pass by missing one)', () => {
    const text = [
      "import { a } from '../core/x.js';",
      "import type { B } from '../core/y.js';",
      "export * from '../cli/z.js';",
      "import '../fixtures/side-effect.js';",
      "const m = await import('../bench/lazy.js');",
      'import {\n  c,\n  d,\n} from "../test/multi.js";',
    ].join('\n');
    expect(importsOf(text)).toEqual(['../core/x.js', '../core/y.js', '../cli/z.js', '../test/multi.js', '../fixtures/side-effect.js', '../bench/lazy.js']);
  });
});
