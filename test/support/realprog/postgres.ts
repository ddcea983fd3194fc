// A throw-away PostgreSQL cluster for snapshot tests: initdb'd and run as
// uid/gid 65534 (postgres refuses to run as root) in a temporary directory
// owned by that uid, listening only on a unix socket in that directory. The
// postmaster is started by pg_ctl, which exits: the postmaster is NOT a child
// of the test process (see core/demo/launch.ts for why that matters).
import { spawn, spawnSync } from 'node:child_process';
import { chownSync, existsSync, mkdtempSync, readFileSync, readdirSync, realpathSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { delimiter, dirname, join } from 'node:path';

export const PG_UID = 65534;
export const PG_GID = 65534;

function which(name: string): string | null {
  for (const dir of (process.env['PATH'] ?? '').split(delimiter)) {
    const p = join(dir, name);
    if (existsSync(p)) return p;
  }
  return null;
}

/** The directory holding postgres, initdb, pg_ctl, psql and pgbench, or why there is none. */
export function postgresBinDir(): { dir: string } | { missing: string } {
  // Debian keeps postgres off PATH, in /usr/lib/postgresql/<major>/bin (the newest wins).
  const installed = existsSync('/usr/lib/postgresql')
    ? readdirSync('/usr/lib/postgresql')
        .filter((v) => /^\d+$/.test(v))
        .sort((a, b) => Number(b) - Number(a))
        .map((v) => join('/usr/lib/postgresql', v, 'bin', 'postgres'))
        .find((p) => existsSync(p))
    : undefined;
  const postgres = which('postgres') ?? installed ?? null;
  if (postgres === null) return { missing: 'postgres is neither on PATH nor in /usr/lib/postgresql/*/bin' };
  const dir = dirname(realpathSync(postgres));
  for (const tool of ['initdb', 'pg_ctl', 'psql', 'pgbench']) {
    if (!existsSync(join(dir, tool))) return { missing: `${tool} is not in ${dir}` };
  }
  return { dir };
}

export interface PgbenchRun {
  code: number | null;
  stdout: string;
  stderr: string;
  /** "number of transactions actually processed: N" */
  processed: number;
  /** "number of failed transactions: N" */
  failed: number;
}

export interface BackendRow {
  pid: number;
  applicationName: string;
  state: string;
  backendType: string;
}

export class Postgres {
  readonly dataDir: string;
  readonly logFile: string;
  private running = false;

  private constructor(
    readonly bin: string,
    /** The temporary directory: data dir, log and the unix socket. */
    readonly dir: string,
  ) {
    this.dataDir = join(dir, 'data');
    this.logFile = join(dir, 'server.log');
  }

  /** initdb a new cluster (superuser "postgres", trust authentication, no fsync). */
  static init(bin: string): Postgres {
    const dir = mkdtempSync(join(tmpdir(), 'wpsnap-pg-'));
    chownSync(dir, PG_UID, PG_GID);
    const pg = new Postgres(bin, dir);
    pg.asPostgres('initdb', ['-D', pg.dataDir, '-U', 'postgres', '-A', 'trust', '-N', '-E', 'UTF8', '--locale=C']);
    writeFileSync(join(pg.dataDir, 'postgresql.conf'), "\ninclude_if_exists = 'wpsnap-test.conf'\n", { flag: 'a' });
    return pg;
  }

  private asPostgres(tool: string, args: string[], timeoutMs = 60_000): string {
    const r = spawnSync('setpriv', [`--reuid=${PG_UID}`, `--regid=${PG_GID}`, '--clear-groups', '--', join(this.bin, tool), ...args], {
      encoding: 'utf8',
      timeout: timeoutMs,
      cwd: this.dir,
      env: { ...process.env, LC_ALL: 'C', PGDATA: undefined },
    });
    if (r.status !== 0) throw new Error(`${tool} ${args.join(' ')} failed (${r.status ?? r.signal ?? r.error?.message}):\n${r.stdout}${r.stderr}`);
    return r.stdout;
  }

  /** Start (or restart) the server with these settings on top of the defaults. */
  start(settings: Record<string, string> = {}): void {
    if (this.running) this.stop();
    const all: Record<string, string> = {
      listen_addresses: "''",
      unix_socket_directories: `'${this.dir}'`,
      shared_buffers: '64MB',
      fsync: 'off',
      synchronous_commit: 'off',
      full_page_writes: 'off',
      log_min_messages: 'warning',
      ...settings,
    };
    const conf = join(this.dataDir, 'wpsnap-test.conf');
    writeFileSync(conf, Object.entries(all).map(([k, v]) => `${k} = ${v}\n`).join(''));
    chownSync(conf, PG_UID, PG_GID);
    this.asPostgres('pg_ctl', ['-D', this.dataDir, '-l', this.logFile, '-w', '-t', '60', 'start']);
    this.running = true;
  }

  /** pg_ctl stop -m fast on this data directory (immediate if fast does not finish); safe to call twice. */
  stop(): void {
    if (!this.running || !existsSync(join(this.dataDir, 'postmaster.pid'))) {
      this.running = false;
      return;
    }
    try {
      this.asPostgres('pg_ctl', ['-D', this.dataDir, '-w', '-t', '30', '-m', 'fast', 'stop']);
    } catch {
      this.asPostgres('pg_ctl', ['-D', this.dataDir, '-w', '-t', '30', '-m', 'immediate', 'stop']);
    }
    this.running = false;
  }

  /** Stop the server and remove the directory. */
  destroy(): void {
    try {
      this.stop();
    } finally {
      rmSync(this.dir, { recursive: true, force: true });
    }
  }

  /** The postmaster's pid (first line of postmaster.pid). */
  get pid(): number {
    return Number(readFileSync(join(this.dataDir, 'postmaster.pid'), 'utf8').split('\n')[0]);
  }

  /** Run SQL with psql (as root, over the socket); unaligned tuples-only output. */
  psql(sql: string): string {
    const r = spawnSync(join(this.bin, 'psql'), ['-h', this.dir, '-U', 'postgres', '-X', '-v', 'ON_ERROR_STOP=1', '-Atc', sql, 'postgres'], {
      encoding: 'utf8',
      timeout: 60_000,
    });
    if (r.status !== 0) throw new Error(`psql -c ${JSON.stringify(sql)} failed (${r.status ?? r.signal}): ${r.stderr}`);
    return r.stdout.trim();
  }

  backends(): BackendRow[] {
    const out = this.psql("SELECT pid, coalesce(application_name, ''), coalesce(state, ''), backend_type FROM pg_stat_activity ORDER BY pid");
    return out
      .split('\n')
      .filter((l) => l.length > 0)
      .map((l) => {
        const [pid, applicationName, state, backendType] = l.split('|');
        return { pid: Number(pid), applicationName: applicationName!, state: state!, backendType: backendType! };
      });
  }

  /** The postmaster's children: pid and process title (e.g. "postgres: checkpointer "). */
  children(): Array<{ pid: number; title: string }> {
    const postmaster = this.pid;
    const out: Array<{ pid: number; title: string }> = [];
    for (const entry of readdirSync('/proc')) {
      if (!/^\d+$/.test(entry)) continue;
      try {
        const stat = readFileSync(`/proc/${entry}/stat`, 'utf8');
        const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
        if (ppid !== postmaster) continue;
        out.push({ pid: Number(entry), title: readFileSync(`/proc/${entry}/cmdline`, 'utf8').replace(/\0+$/, '').replace(/\0/g, ' ') });
      } catch {
        // exited meanwhile
      }
    }
    return out;
  }

  serverLog(): string {
    return existsSync(this.logFile) ? readFileSync(this.logFile, 'utf8') : '';
  }

  /** A psql session running `sql` in the background (its backend stays until the SQL ends). */
  session(sql: string): { done: Promise<{ code: number | null; stderr: string }>; cancel: () => void } {
    const child = spawn(join(this.bin, 'psql'), ['-h', this.dir, '-U', 'postgres', '-X', '-Atc', sql, 'postgres'], { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const done = new Promise<{ code: number | null; stderr: string }>((resolve) => child.once('close', (code) => resolve({ code, stderr })));
    return { done, cancel: () => child.kill('SIGINT') };
  }

  /** pgbench against this server (as a child of the test process: it is a client, never a snapshot target). */
  pgbench(args: string[], timeoutMs = 120_000): Promise<PgbenchRun> {
    return new Promise((resolve, reject) => {
      const child = spawn(join(this.bin, 'pgbench'), ['-h', this.dir, '-U', 'postgres', ...args, 'postgres'], { stdio: ['ignore', 'pipe', 'pipe'] });
      let stdout = '';
      let stderr = '';
      child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
      child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
      const timer = setTimeout(() => {
        child.kill('SIGKILL');
        reject(new Error(`pgbench ${args.join(' ')} did not finish within ${timeoutMs} ms`));
      }, timeoutMs);
      child.once('error', reject);
      child.once('close', (code) => {
        clearTimeout(timer);
        const num = (re: RegExp): number => Number(re.exec(stdout)?.[1] ?? Number.NaN);
        resolve({
          code,
          stdout,
          stderr,
          processed: num(/number of transactions actually processed: (\d+)/),
          failed: num(/number of failed transactions: (\d+)/),
        });
      });
    });
  }
}
