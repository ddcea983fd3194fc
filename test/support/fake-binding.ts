// A scripted stand-in for the native addon, for the fast tier: no root, no
// ptrace, no userfaultfd. It answers the calls of the snapshot path the way
// the kernel would for a script the test sets, and records what was called,
// so the TypeScript around the addon (pause cleanup, errors, interruption,
// the store pipeline, planning) can be tested in milliseconds. Tests that
// claim kernel behaviour never use it.
import type { Attacher, StoppedTarget } from '../../core/attacher.js';
import type {
  EngineFinalStats,
  EngineLiveStats,
  EngineCreateOptions,
  EngineMessage,
  EngineOptions,
  EngineRunOptions,
  NativeBinding,
  NativeHandle,
} from '../../core/native/binding.js';

const PAGE = 4096;

/** An Error shaped as the addon throws them. */
export function nativeError(code: string, errno: number, syscall: string, message = `${syscall}: ${code}`): Error {
  return Object.assign(new Error(message), { code, errno, syscall });
}

/** Content the fake engine "copies" for the page at address: 8-byte words derived from it, never all zero. */
export function fakePageContent(address: bigint): Buffer {
  const page = Buffer.alloc(PAGE);
  for (let i = 0; i < PAGE; i += 8) page.writeBigUInt64LE(address ^ BigInt(i + 1) ^ 0x9e3779b97f4a7c15n, i);
  return page;
}

export interface FakeScript {
  /** UFFDIO_API features the kernel offers (default: every feature). */
  features?: bigint;
  /** uffdRegister throws this for a region whose start is given. */
  registerError?: (start: bigint) => Error | undefined;
  /** populatedRanges: the populated runs of [start, end) (default: the whole range). */
  populated?: (start: bigint, end: bigint) => Array<[bigint, bigint]>;
  /** Pages of each engine region the engine "saves" (from its start; default 8). */
  pagesPerRegion?: number;
  /** The engine ends with this error instead of finishing. */
  engineError?: Error;
  /** The engine waits for engineStop instead of finishing. */
  engineHangs?: boolean;
  /** Batches the engine posts that the store must refuse (misaligned addresses). */
  badBatch?: boolean;
}

export interface FakeCalls {
  registered: bigint[];
  protectedRanges: bigint[];
  closed: number[];
  engineStarts: EngineOptions[];
  engineStops: number;
  released: number[];
}

export const FAKE_UFFD = 2000;
export const FAKE_PIDFD = 1000;

export class FakeKernel {
  readonly calls: FakeCalls = { registered: [], protectedRanges: [], closed: [], engineStarts: [], engineStops: 0, released: [] };
  resumes = 0;
  stops = 0;

  constructor(readonly script: FakeScript = {}) {}

  /** An attacher that "stops" the target and hands over FAKE_UFFD. */
  attacher(): (binding: NativeBinding, pid: number, pidfd: number) => Attacher {
    return () => ({
      prepare: () => undefined,
      rearm: () => undefined,
      release: () => undefined,
      stop: (): StoppedTarget => {
        this.stops++;
        return {
          threads: [{ tid: 1, regs: Buffer.alloc(216, 1), fpregs: Buffer.alloc(512, 2), xstate: Buffer.alloc(0) }],
          obtainUffd: () => ({ fd: FAKE_UFFD, method: 'syscall' }),
          resume: () => {
            this.resumes++;
          },
        };
      },
    });
  }

  binding(): NativeBinding {
    const notScripted = (name: string) => () => {
      throw new Error(`fake binding: ${name} is not scripted`);
    };
    const script = this.script;
    const calls = this.calls;
    const fake: Partial<NativeBinding> = {
      probeUffd: () => ({ features: script.features ?? 0x1ffffn, ioctls: 0n }),
      probePagemapScan: () => 0,
      pidfdOpen: () => FAKE_PIDFD,
      closeFd: (fd) => {
        calls.closed.push(fd);
      },
      uffdApi: (_fd, features) => ({ features, ioctls: 0n }),
      uffdRegister: (_fd, start) => {
        const error = script.registerError?.(start);
        if (error) throw error;
        calls.registered.push(start);
        return 0n;
      },
      uffdWriteProtectRanges: (_fd, ranges) => {
        calls.protectedRanges.push(...ranges);
      },
      populatedRanges: (_pid, ranges) => {
        const counts: number[] = [];
        const runs: bigint[] = [];
        for (let i = 0; i < ranges.length; i += 2) {
          const found = script.populated?.(ranges[i]!, ranges[i + 1]!) ?? [[ranges[i]!, ranges[i + 1]!]];
          counts.push(found.length);
          for (const [s, e] of found) runs.push(s, e);
        }
        return { counts: Uint32Array.from(counts), ranges: BigUint64Array.from(runs) };
      },
      countPrivatePages: () => 0,
      copyPrivatePages: () => ({ addresses: new BigUint64Array(0), data: Buffer.alloc(0) }),
      copyFilePages: () => ({ addresses: new BigUint64Array(0), data: Buffer.alloc(0) }),
      engineCreate: (options, onMessage) => {
        this.created = { options, onMessage };
        return { __brand: 'native-handle' } as NativeHandle;
      },
      engineRun: (_handle, options) => {
        this.prepared = options;
      },
      engineGo: () => {
        const created = this.created!;
        this.startEngine({ ...created.options, ...this.prepared! }, created.onMessage);
      },
      engineClose: () => undefined,
      engineTrack: () => undefined,
      engineTrackTake: () => ({ written: new BigUint64Array(0), invalid: new BigUint64Array(0), overflowed: false, faults: 0, forks: 0 }),
      engineRelease: (_handle, slot) => {
        calls.released.push(slot);
      },
      engineStop: () => {
        calls.engineStops++;
        this.stopEngine?.();
      },
      engineStats: () => this.liveStats(),
      engineJoin: () => undefined,
    };
    return new Proxy(fake as NativeBinding, {
      get: (target, name: string) => (name in target ? target[name as keyof NativeBinding] : notScripted(name)),
    });
  }

  private saved = 0;
  private stopEngine: (() => void) | undefined;
  private created: { options: EngineCreateOptions; onMessage: (m: EngineMessage) => void } | undefined;
  private prepared: EngineRunOptions | undefined;

  private liveStats(): EngineLiveStats {
    return {
      faults: 0,
      pagesFromFaults: 0,
      pagesFromSweep: this.saved,
      pagesZero: 0,
      zeroPagesBy: { marker: 0, sharedZeroPage: 0, hugeZeroPage: 0, fileHole: 0, sparse: 0 },
      pagesLost: 0,
      bytesCopied: this.saved * PAGE,
      events: 0,
      eagainRetries: 0,
      overflowBatches: 0,
      totalPages: this.saved,
      stagedBatches: 0,
      storeBatches: 0,
      stagingBytes: 0,
      stagingBytesPeak: 0,
      spillBytesPeak: 0,
      spilledBatches: 0,
      poolBytes: 0,
    };
  }

  private startEngine(options: EngineOptions, onMessage: (m: EngineMessage) => void): void {
    this.calls.engineStarts.push(options);
    const per = this.script.pagesPerRegion ?? 8;
    const finish = (extra: Partial<EngineFinalStats>): void => {
      const stats: EngineFinalStats = {
        ...this.liveStats(),
        faultServiceP50Micros: 0,
        faultServiceP99Micros: 0,
        faultServiceMaxMicros: 0,
        latencySamples: 0,
        windowMicros: 0,
        lost: [],
        stopped: 0,
        ...extra,
      };
      onMessage({ type: 'window', windowMicros: 0 });
      onMessage({ type: 'done', stats });
    };
    setImmediate(() => {
      let slot = 0;
      for (const region of options.regions) {
        const count = Math.min(per, Number((region.end - region.start) / BigInt(PAGE)));
        const addresses = new BigUint64Array(count);
        const data = new Uint8Array(count * PAGE);
        for (let i = 0; i < count; i++) {
          const address = region.start + BigInt(i * PAGE) + (this.script.badBatch ? 1n : 0n);
          addresses[i] = address;
          data.set(fakePageContent(address), i * PAGE);
        }
        if (count === 0) continue;
        this.saved += count;
        onMessage({ type: 'batch', slot: slot++, addresses, data });
      }
      if (this.script.engineHangs) {
        this.stopEngine = () =>
          setImmediate(() =>
            finish({ stopped: 1, lost: options.regions.map((r) => ({ address: r.start, pages: 1, reason: 'interrupted' })) }),
          );
        return;
      }
      if (this.script.engineError) finish({ error: this.script.engineError as EngineFinalStats['error'] });
      else finish({});
    });
  }
}
