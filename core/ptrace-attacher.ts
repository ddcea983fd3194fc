// The attach by ptrace injection: the tracer helper freezes every thread,
// runs userfaultfd() inside the target from a `syscall` instruction of its
// vDSO, and wpsnap takes the fd with pidfd_getfd (core/attach.ts).
import {
  readSignalActions,
  readTidAddresses,
  findSyscallInstruction,
  freeze,
  injectUserfaultfd,
  prepareDeviceNode,
  targetMayCallUserfaultfd,
  type DeviceNode,
} from './attach.js';
import type { Attacher, StoppedTarget } from './attacher.js';
import { fromNative } from '../common/errors.js';
import type { NativeBinding } from './native/binding.js';

export function ptraceAttacher(binding: NativeBinding, pid: number, pidfd: number): Attacher {
  let insn: bigint | undefined;
  let deviceNode: DeviceNode | null = null;
  return {
    prepare(): void {
      insn = findSyscallInstruction(binding, pid);
      deviceNode = targetMayCallUserfaultfd(pid) ? null : prepareDeviceNode(binding, pid);
      try {
        binding.prepareFreeze();
      } catch (error) {
        throw fromNative(error, 'start the tracer helper');
      }
    },
    stop(options: { tidAddresses?: boolean } = {}): StoppedTarget {
      if (insn === undefined) throw new Error('ptraceAttacher: stop() before prepare()');
      const syscallInsn = insn;
      const frozen = freeze(binding, pid, options.tidAddresses === true ? { tidAddresses: { syscallInsn } } : {});
      return {
        threads: frozen.threads.map((t) => ({
          tid: t.tid,
          regs: t.regs,
          fpregs: t.fpregs,
          xstate: t.xstate,
          sigmask: t.sigmask,
          ...(t.clearChildTid === undefined ? {} : { clearChildTid: t.clearChildTid }),
          ...(t.robustList === undefined ? {} : { robustList: t.robustList }),
          ...(t.rseqArea === undefined ? {} : { rseq: { area: t.rseqArea, size: t.rseqSize ?? 32, signature: t.rseqSignature ?? 0 } }),
        })),
        obtainUffd: () => injectUserfaultfd(binding, pid, frozen, syscallInsn, pidfd, deviceNode),
        readSignalActions: (signals) => readSignalActions(binding, pid, frozen, syscallInsn, signals),
        readTidAddresses: (tids) => readTidAddresses(binding, pid, frozen, syscallInsn, tids),
        resume: () => binding.thaw(frozen.handle),
      };
    },
    rearm(): void {
      // The tracer helper serves one freeze and exits with its thaw: start the next one now.
      try {
        binding.prepareFreeze();
      } catch (error) {
        throw fromNative(error, 'start the tracer helper');
      }
    },
    release(): void {
      deviceNode?.remove();
      deviceNode = null;
    },
  };
}
