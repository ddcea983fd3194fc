// The one error class: its category follows from its code, the CLI's exit
// code from the category, and a code from outside (errno, SQLite) is kept.
import { describe, expect, it } from 'vitest';
import { ExitCode, exitCodeFor } from '../../cli/exit-codes.js';
import { WpsnapError, categoryOf, externalCode, fromNative, namedCodes, usageError } from '../../common/errors.js';

describe('error codes', () => {
  it('each category has its exit code', () => {
    const expected = { usage: 2, unsupported: 3, targetGone: 4, interrupted: 130, failure: 1 } as const;
    for (const [code, category] of namedCodes()) expect(exitCodeFor(new WpsnapError(code, 'x'))).toBe(expected[category]);
    expect(exitCodeFor(usageError('bad'))).toBe(ExitCode.usage);
    expect(exitCodeFor(new WpsnapError('TARGET_NOT_FOUND', 'gone'))).toBe(4);
    expect(exitCodeFor(new WpsnapError('INTERRUPTED', 'stop'))).toBe(130);
    expect(exitCodeFor(new WpsnapError('NO_VDSO', 'no'))).toBe(3);
  });

  it('errno codes: ESRCH is a target gone, others failures; an unnamed errno keeps its number', () => {
    expect(categoryOf('ESRCH')).toBe('targetGone');
    expect(categoryOf('EPERM')).toBe('failure');
    const wrapped = fromNative(Object.assign(new Error('ptrace: No such process'), { code: 'ESRCH', errno: 3, syscall: 'ptrace' }), 'freeze pid 7');
    expect(wrapped.code).toBe('ESRCH');
    expect(wrapped.kind).toBe('targetGone');
    expect(wrapped.message).toBe('freeze pid 7: ptrace: No such process');
    expect(wrapped.errno).toBe(3);
    const unnamed = fromNative(Object.assign(new Error('odd'), { errno: 531 }), 'step');
    expect(unnamed.code).toBe('UNKNOWN_ERRNO_531');
  });

  it('a code from outside is kept when it is an errno or SQLite name, else the fallback stands', () => {
    expect(externalCode('ENOSPC', 'STORE_IO')).toBe('ENOSPC');
    expect(externalCode('SQLITE_FULL', 'STORE_IO')).toBe('SQLITE_FULL');
    expect(externalCode(undefined, 'STORE_IO')).toBe('STORE_IO');
    expect(externalCode('weird code', 'EXPORT_IO')).toBe('EXPORT_IO');
  });
});
