#!/usr/bin/env node
// wpsnap command line. main(argv, ctx) runs one command and returns the exit
// code; only the bottom of this file (the executable entry) calls process.exit.
import { realpathSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import yargs, { type Argv } from 'yargs';
import { WpsnapError, usageError } from '../common/errors.js';
import { ExitCode, exitCodeFor } from './exit-codes.js';
import { checkCommand } from './commands/check.js';
import { demoCommand } from './commands/demo.js';
import { diffCommand } from './commands/diff.js';
import { exportCommand } from './commands/export.js';
import { gcCommand } from './commands/gc.js';
import { logCommand } from './commands/log.js';
import { lsCommand } from './commands/ls.js';
import { rmCommand } from './commands/rm.js';
import { rollbackCommand } from './commands/rollback.js';
import { restoreCommand } from './commands/restore.js';
import { showCommand } from './commands/show.js';
import { snapshotCommand } from './commands/snapshot.js';
import { serveCommand } from './commands/serve.js';
import { precopyCommand } from './commands/precopy.js';
import { trackCommand } from './commands/track.js';
import { statusCommand } from './commands/status.js';
import { untrackCommand } from './commands/untrack.js';
import { verifyCommand } from './commands/verify.js';
import type { CommandSpec, GlobalArgs } from './commands/types.js';
import { defaultContext, toJson, type CommandContext } from './context.js';
import { usageMessage } from './args.js';

// Each command's argument type is its own (inferred from its options); the
// list erases it, and yargs hands each handler what its builder defined.
const COMMANDS: Array<CommandSpec<any>> = [
  snapshotCommand,
  serveCommand,
  trackCommand,
  untrackCommand,
  statusCommand,
  precopyCommand,
  lsCommand,
  showCommand,
  diffCommand,
  verifyCommand,
  exportCommand,
  rollbackCommand,
  restoreCommand,
  rmCommand,
  logCommand,
  gcCommand,
  checkCommand,
  demoCommand,
];

function reportError(ctx: CommandContext, error: WpsnapError, json: boolean): void {
  if (json) {
    ctx.stderr.write(toJson({ error: { code: error.code, message: error.message, exitCode: exitCodeFor(error) } }, { compact: true }) + '\n');
  } else {
    ctx.stderr.write(`wpsnap: ${error.message.split('\n')[0]}\n`);
  }
}

function asWpsnapError(error: unknown): WpsnapError {
  if (error instanceof WpsnapError) return error;
  const message = error instanceof Error ? error.message : String(error);
  return new WpsnapError('INTERNAL', message, { cause: error });
}

/** The command named in argv, with its positionals, for usage messages. */
function commandIn(argv: readonly string[]): { name: string; positionals: string[] } | undefined {
  const spec = COMMANDS.find((c) => argv.includes(c.command.split(' ')[0]!));
  if (!spec) return undefined;
  const [name, ...rest] = spec.command.split(' ');
  return { name: name!, positionals: rest.map((p) => p.replace(/[<>[\]]/g, '')) };
}

export async function main(argv: string[], ctx: CommandContext = defaultContext(new AbortController().signal)): Promise<ExitCode> {
  const json = argv.includes('--json');
  const parser = yargs(argv)
    .scriptName('wpsnap')
    .usage('$0 <command> [options]\n\nBackground memory snapshots of running Linux processes (userfaultfd write-protect).')
    .option('store', { type: 'string', global: true, describe: 'store file (default: $WPSNAP_STORE, else $XDG_DATA_HOME/wpsnap/store.db)' })
    .option('json', { type: 'boolean', global: true, default: false, describe: 'print one JSON document on stdout' })
    .strict()
    .demandCommand(1, 'name a command (wpsnap --help lists them)')
    .completion('completion', 'Print a bash/zsh completion script (wpsnap completion >> ~/.bashrc)')
    .exitProcess(false)
    .help()
    .version()
    .wrap(Math.min(100, process.stdout.columns ?? 100))
    // Throwing here is what stops yargs: a fail() callback that returns lets
    // it go on and run the command's handler after a validation error.
    // yargs reports its own validation, and a `coerce` check's error, as a
    // YError: both are usage errors.
    .fail((message, error) => {
      if (error && error.name !== 'YError') throw asWpsnapError(error);
      throw usageError(usageMessage(error?.message ?? message ?? 'bad usage', argv, commandIn(argv)));
    });
  for (const spec of COMMANDS) {
    parser.command(
      spec.command,
      spec.describe,
      (y) => spec.builder(y as Argv<GlobalArgs>),
      (args) => spec.handler(args, ctx),
    );
  }
  try {
    await parser.parseAsync();
  } catch (error) {
    const failure = asWpsnapError(error);
    reportError(ctx, failure, json);
    return exitCodeFor(failure);
  }
  return ExitCode.ok;
}

function isEntryPoint(): boolean {
  try {
    return process.argv[1] !== undefined && realpathSync(process.argv[1]) === realpathSync(fileURLToPath(import.meta.url));
  } catch {
    return false;
  }
}

if (isEntryPoint()) {
  const controller = new AbortController();
  let interrupts = 0;
  const onSignal = (): void => {
    interrupts++;
    if (interrupts > 1) process.exit(ExitCode.interrupted);
    controller.abort();
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  // A reader that stopped reading (`wpsnap show | head`) costs the rest of the output, never the command.
  for (const stream of [process.stdout, process.stderr]) stream.on('error', (error: NodeJS.ErrnoException) => {
    if (error.code !== 'EPIPE') throw error;
  });
  const code = await main(process.argv.slice(2), defaultContext(controller.signal));
  // process.exit() does not wait for a pipe to drain: a large --json document
  // to a slow reader would be cut off. Flush stdout and stderr first.
  await Promise.all([process.stdout, process.stderr].map((stream) => new Promise<void>((resolve) => stream.write('', () => resolve()))));
  process.exit(code);
}
