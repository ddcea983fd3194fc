// The commands' argument types come from their option definitions
// (cli/commands/types.ts defineCommand): a handler sees what its builder
// defines, with coerce's result type, and nothing it did not define. Checked
// by the type checker (npm test runs tsc on the tests first); the runtime
// assertions only keep vitest from reporting an empty file.
import type { ArgumentsCamelCase } from 'yargs';
import { describe, expect, expectTypeOf, it } from 'vitest';
import type { CommandSpec } from '../../cli/commands/types.js';
import { demoCommand } from '../../cli/commands/demo.js';
import { exportCommand } from '../../cli/commands/export.js';
import { lsCommand } from '../../cli/commands/ls.js';
import { rmCommand } from '../../cli/commands/rm.js';
import { snapshotCommand } from '../../cli/commands/snapshot.js';

type ArgsOf<C> = C extends CommandSpec<infer A> ? ArgumentsCamelCase<A> : never;

describe('command argument types', () => {
  it('are inferred from the options each command defines', () => {
    expectTypeOf<ArgsOf<typeof snapshotCommand>['pid']>().toEqualTypeOf<number[] | undefined>();
    expectTypeOf<ArgsOf<typeof snapshotCommand>['tree']>().toEqualTypeOf<boolean>();
    expectTypeOf<ArgsOf<typeof snapshotCommand>['cgroup']>().toEqualTypeOf<string | undefined>();
    expectTypeOf<ArgsOf<typeof snapshotCommand>['rate']>().toEqualTypeOf<number | undefined>();
    expectTypeOf<ArgsOf<typeof snapshotCommand>['maxSharedCopy']>().toEqualTypeOf<number | undefined>();
    expectTypeOf<ArgsOf<typeof snapshotCommand>['name']>().toEqualTypeOf<string | undefined>();
    expectTypeOf<ArgsOf<typeof exportCommand>['snapshot']>().toEqualTypeOf<string>();
    expectTypeOf<ArgsOf<typeof exportCommand>['out']>().toEqualTypeOf<string>();
    expectTypeOf<ArgsOf<typeof exportCommand>['allowIncomplete']>().toEqualTypeOf<boolean>();
    expectTypeOf<ArgsOf<typeof demoCommand>['mib']>().toEqualTypeOf<number>();
    expectTypeOf<ArgsOf<typeof rmCommand>['snapshot']>().toEqualTypeOf<string>();
    // The global options reach every command.
    expectTypeOf<ArgsOf<typeof lsCommand>['json']>().toEqualTypeOf<boolean>();
    expectTypeOf<ArgsOf<typeof lsCommand>['store']>().toEqualTypeOf<string | undefined>();
    // An option a command does not define is only yargs' catch-all unknown.
    expectTypeOf<ArgsOf<typeof lsCommand>['pid']>().toEqualTypeOf<unknown>();
    expect(snapshotCommand.command).toBe('snapshot [pid..]');
  });
});
