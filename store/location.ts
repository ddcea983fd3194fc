// Where the page store lives when the user does not say.
import { homedir } from 'node:os';
import { join, resolve } from 'node:path';

/**
 * The store path: `--store PATH`, else `$WPSNAP_STORE`, else
 * `$XDG_DATA_HOME/wpsnap/store.db`, else `~/.local/share/wpsnap/store.db`.
 * Relative paths are resolved against the current directory; a relative
 * `$XDG_DATA_HOME` is ignored, as the XDG base directory spec requires.
 */
export function resolveStorePath(option?: string, env: NodeJS.ProcessEnv = process.env): string {
  if (option !== undefined && option !== '') return resolve(option);
  const fromEnv = env['WPSNAP_STORE'];
  if (fromEnv !== undefined && fromEnv !== '') return resolve(fromEnv);
  const xdg = env['XDG_DATA_HOME'];
  if (xdg !== undefined && xdg.startsWith('/')) return join(xdg, 'wpsnap', 'store.db');
  const home = env['HOME'] !== undefined && env['HOME'] !== '' ? env['HOME'] : homedir();
  return join(home, '.local', 'share', 'wpsnap', 'store.db');
}
