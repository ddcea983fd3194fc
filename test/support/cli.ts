// Run the real CLI in-process (main(argv) with captured output) or as a child
// process (when a test needs to kill it).
import { spawn } from 'node:child_process';
import { Writable } from 'node:stream';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { main } from '../../cli/main.js';
import { defaultContext, type CommandContext } from '../../cli/context.js';
import type { NativeBinding } from '../../core/binding.js';

export const ROOT = fileURLToPath(new URL('../../', import.meta.url));
export const CLI_JS = join(ROOT, 'dist', 'cli', 'main.js');

class Capture extends Writable {
  text = '';
  isTTY = false;
  override _write(chunk: Buffer | string, _enc: BufferEncoding, done: () => void): void {
    this.text += chunk.toString();
    done();
  }
}

export interface CliRun {
  code: number;
  stdout: string;
  stderr: string;
}

export async function runCli(argv: string[], overrides: Partial<CommandContext> = {}): Promise<CliRun> {
  const stdout = new Capture();
  const stderr = new Capture();
  const ctx: CommandContext = { ...defaultContext(new AbortController().signal), stdout, stderr, ...overrides };
  const code = await main(argv, ctx);
  return { code, stdout: stdout.text, stderr: stderr.text };
}

/** A binding whose kernel lacks the given features (pure logic: the probe answers as such a kernel would). */
export function bindingWithFeatures(real: NativeBinding, features: bigint): NativeBinding {
  return { ...real, probeUffd: () => ({ features, ioctls: 0n }) };
}

export interface ChildRun {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** The built CLI as a child process (dist/, built by npm install). */
export function runCliProcess(argv: string[], env: NodeJS.ProcessEnv = {}, timeoutMs = 60_000): Promise<ChildRun> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CLI_JS, ...argv], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`wpsnap ${argv.join(' ')} timed out`));
    }, timeoutMs);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
  });
}
