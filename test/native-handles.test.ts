// Native handles carry their kind (napi_type_tag_object): a handle of one kind
// passed where another is expected is refused with a TypeError, never
// reinterpreted as the other kind's memory. Real addon, a real frozen sleeper.
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { loadBinding, type NativeBinding } from '../core/binding.js';
import type { NativeHandle } from '../core/native/binding.js';
import { untraced } from './support/proc.js';
import { killDetached, startDetached } from './support/spawn.js';

let B: NativeBinding;
beforeAll(() => {
  B = loadBinding();
});
afterEach(() => {
  killDetached();
});

describe('native handles are typed', () => {
  it('a freeze handle is refused by every engine call, and still thaws its target', async () => {
    const target = await startDetached('sleeper');
    B.prepareFreeze();
    const freezeHandle = B.freeze(target.pid);
    try {
      expect(() => B.engineStop(freezeHandle)).toThrow(TypeError);
      expect(() => B.engineStats(freezeHandle)).toThrow(/engineStats/);
      expect(() => B.engineJoin(freezeHandle)).toThrow(TypeError);
      expect(() => B.engineRelease(freezeHandle, 0)).toThrow(TypeError);
      // The refused calls did nothing to it: it is still a working freeze handle.
      expect(B.frozenThreads(freezeHandle).length).toBeGreaterThanOrEqual(3);
    } finally {
      B.thaw(freezeHandle);
    }
    await untraced(target.pid);
  });

  it('things that are not handles (an object, a number, a buffer) are refused by handle calls of both kinds', () => {
    for (const fake of [{}, 42, Buffer.alloc(64), { __brand: 'native-handle' }] as unknown as NativeHandle[]) {
      expect(() => B.engineStop(fake)).toThrow(TypeError);
      expect(() => B.thaw(fake)).toThrow(TypeError);
      expect(() => B.frozenThreads(fake)).toThrow(TypeError);
    }
  });
});
