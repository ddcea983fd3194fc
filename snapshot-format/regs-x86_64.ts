// The layout of the register sets a snapshot keeps per thread on x86_64:
// struct user_regs_struct (arch/x86/include/asm/user_64.h), 27 u64 in this
// order, as PTRACE_GETREGS returns it and an ELF core's NT_PRSTATUS holds it.
import type { ThreadRecord } from './model.js';

export const USER_REGS_FIELDS = [
  'r15', 'r14', 'r13', 'r12', 'rbp', 'rbx', 'r11', 'r10', 'r9', 'r8', 'rax', 'rcx', 'rdx', 'rsi', 'rdi',
  'orig_rax', 'rip', 'cs', 'eflags', 'rsp', 'ss', 'fs_base', 'gs_base', 'ds', 'es', 'fs', 'gs',
] as const;
export type UserRegName = (typeof USER_REGS_FIELDS)[number];

/** Bytes of struct user_regs_struct. */
export const USER_REGS_BYTES = USER_REGS_FIELDS.length * 8;

/** Every register of a user_regs_struct by name; null if the buffer is too short to be one. */
export function decodeUserRegs(regs: Buffer): Record<UserRegName, bigint> | null {
  if (regs.length < USER_REGS_BYTES) return null;
  const out = {} as Record<UserRegName, bigint>;
  USER_REGS_FIELDS.forEach((name, i) => {
    out[name] = regs.readBigUInt64LE(i * 8);
  });
  return out;
}

/** The thread's instruction and stack pointers at T (0 when its registers were not captured). */
export function pcAndSp(thread: Pick<ThreadRecord, 'regs'>): { rip: bigint; rsp: bigint } {
  const regs = decodeUserRegs(thread.regs);
  return regs === null ? { rip: 0n, rsp: 0n } : { rip: regs.rip, rsp: regs.rsp };
}
