import type { ArgumentsCamelCase, Argv } from 'yargs';
import type { CommandContext } from '../context.js';

/** Options every command accepts (defined once in main.ts, global). */
export interface GlobalArgs {
  store: string | undefined;
  json: boolean;
}

/**
 * A command is data plus a handler. A is what its builder's options make of
 * the global ones: the handler's arguments are typed by the options defined,
 * never by a hand-written interface that could drift from them.
 */
export interface CommandSpec<A extends GlobalArgs> {
  command: string;
  describe: string;
  builder: (y: Argv<GlobalArgs>) => Argv<A>;
  handler: (args: ArgumentsCamelCase<A>, ctx: CommandContext) => Promise<void>;
}

/** Identity, so that TypeScript infers A from the builder and types the handler with it. */
export function defineCommand<A extends GlobalArgs>(spec: CommandSpec<A>): CommandSpec<A> {
  return spec;
}
