import type { Argv } from 'yargs';
import type { CommandContext } from '../context.js';

/** Options every command accepts. */
export interface GlobalArgs {
  store?: string;
  json: boolean;
}

/** A command is data plus a handler that gets the parsed arguments and a context. */
export interface CommandSpec<A> {
  command: string;
  describe: string;
  builder: (y: Argv<GlobalArgs>) => Argv<unknown>;
  handler: (args: A & GlobalArgs, ctx: CommandContext) => Promise<void>;
}
