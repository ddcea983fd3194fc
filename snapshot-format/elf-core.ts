// ELF64 x86-64 core files (ET_CORE) laid out as Linux writes them
// (fs/binfmt_elf.c, include/uapi/linux/elfcore.h) and as gdb and BFD read
// them. Pure encoding: the exporter (export-core.ts) decides what goes in.
//
//   offset 0        Elf64_Ehdr                         64 bytes
//   64              Elf64_Phdr × (1 + regions)         56 bytes each: PT_NOTE, then one
//                                                      PT_LOAD per region, by address
//   64 + 56·n       the PT_NOTE segment                notes, each 4-aligned:
//                                                      Elf64_Nhdr {namesz, descsz, type} (12 bytes),
//                                                      name + NUL, padded to 4; desc, padded to 4
//   page-aligned    the PT_LOAD contents, back to back, each p_filesz bytes
//                   (0 for a segment whose content is left out; zero pages are holes)
//   end             with 0xffff or more program headers: one Elf64_Shdr (SHT_NULL)
//                   whose sh_info holds the real count (e_phnum = PN_XNUM)
//
// Notes in the kernel's order (write_note_info): the first thread's
// NT_PRSTATUS, then the process's NT_PRPSINFO, NT_SIGINFO, NT_AUXV, NT_FILE,
// then that thread's NT_PRFPREG and NT_X86_XSTATE; each further thread
// NT_PRSTATUS, NT_SIGINFO, NT_PRFPREG, NT_X86_XSTATE. (The kernel writes one
// NT_SIGINFO, for the signal that killed the process; gdb's gcore writes one
// per thread, which BFD files under the lwp of the NT_PRSTATUS before it.)
import { PAGE_SIZE } from './model.js';
import { USER_REGS_BYTES } from './regs-x86_64.js';

export const EHDR_BYTES = 64;
export const PHDR_BYTES = 56;
export const SHDR_BYTES = 64;
/** e_phnum's escape: the real count is in section header 0's sh_info. */
export const PN_XNUM = 0xffff;

const ET_CORE = 4;
const EM_X86_64 = 62;
const EV_CURRENT = 1;
const ELFCLASS64 = 2;
const ELFDATA2LSB = 1;
const ELFOSABI_NONE = 0;

const PT_LOAD = 1;
const PT_NOTE = 4;
export const PF_X = 1;
export const PF_W = 2;
export const PF_R = 4;

export const NT_PRSTATUS = 1;
export const NT_PRFPREG = 2;
export const NT_PRPSINFO = 3;
export const NT_AUXV = 6;
export const NT_X86_XSTATE = 0x202;
/** "SIGI" */
export const NT_SIGINFO = 0x53494749;
/** "FILE" */
export const NT_FILE = 0x46494c45;

/** struct elf_prstatus on x86_64: elf_prstatus_common (112) + elf_gregset_t (216) + pr_fpvalid (4) + padding. */
export const PRSTATUS_BYTES = 336;
const PRSTATUS_REGS_AT = 112;
const PRSTATUS_FPVALID_AT = PRSTATUS_REGS_AT + USER_REGS_BYTES;
/** struct elf_prpsinfo on x86_64. */
export const PRPSINFO_BYTES = 136;
const PR_FNAME_BYTES = 16;
/** ELF_PRARGSZ */
const PR_PSARGS_BYTES = 80;
/** siginfo_t */
export const SIGINFO_BYTES = 128;
/** struct user_fpregs_struct (FXSAVE area). */
export const FPREGS_BYTES = 512;

const align = (n: number, to: number): number => Math.ceil(n / to) * to;

export interface ElfNote {
  name: 'CORE' | 'LINUX';
  type: number;
  desc: Buffer;
}

/** Bytes of one note in the PT_NOTE segment. */
export function noteSize(note: ElfNote): number {
  return 12 + align(note.name.length + 1, 4) + align(note.desc.length, 4);
}

/** The notes back to back, each with its Elf64_Nhdr, name and desc 4-aligned. */
export function encodeNotes(notes: readonly ElfNote[]): Buffer {
  const out = Buffer.alloc(notes.reduce((n, note) => n + noteSize(note), 0));
  let at = 0;
  for (const note of notes) {
    out.writeUInt32LE(note.name.length + 1, at);
    out.writeUInt32LE(note.desc.length, at + 4);
    out.writeUInt32LE(note.type, at + 8);
    at += 12;
    out.write(note.name, at, 'latin1');
    at += align(note.name.length + 1, 4);
    note.desc.copy(out, at);
    at += align(note.desc.length, 4);
  }
  return out;
}

export interface PrStatus {
  /** The signal that caused the dump; 0: none (a snapshot is not a crash). */
  signal: number;
  /** The thread's id (pr_pid). */
  tid: number;
  ppid: number;
  pgrp: number;
  sid: number;
  /** Blocked signals (pr_sighold, bit n-1: signal n); undefined (not recorded): 0. */
  sigHold?: bigint | undefined;
  /** struct user_regs_struct, 216 bytes. */
  regs: Buffer;
  /** An NT_PRFPREG note follows. */
  fpValid: boolean;
}

/** NT_PRSTATUS: struct elf_prstatus (elf_siginfo, cursig, sigpend, sighold, pid, ppid, pgrp, sid, 4 timevals, regs, fpvalid). */
export function prStatus(s: PrStatus): Buffer {
  if (s.regs.length !== USER_REGS_BYTES) throw new RangeError(`user_regs_struct is ${USER_REGS_BYTES} bytes, not ${s.regs.length}`);
  const b = Buffer.alloc(PRSTATUS_BYTES);
  b.writeInt32LE(s.signal, 0); // pr_info.si_signo (si_code, si_errno: 0)
  b.writeInt16LE(s.signal, 12); // pr_cursig
  b.writeBigUInt64LE(s.sigHold ?? 0n, 24); // pr_sighold (pr_sigpend at 16: 0, pending signals are not recorded)
  b.writeInt32LE(s.tid, 32);
  b.writeInt32LE(s.ppid, 36);
  b.writeInt32LE(s.pgrp, 40);
  b.writeInt32LE(s.sid, 44);
  // 48..112: pr_utime, pr_stime, pr_cutime, pr_cstime, not recorded: 0
  s.regs.copy(b, PRSTATUS_REGS_AT);
  b.writeInt32LE(s.fpValid ? 1 : 0, PRSTATUS_FPVALID_AT);
  return b;
}

export interface PrPsInfo {
  /** A /proc state letter; its index in "RSDTZW" is pr_state. */
  state: string;
  nice: number;
  uid: number;
  gid: number;
  pid: number;
  ppid: number;
  pgrp: number;
  sid: number;
  /** comm, cut to 15 bytes. */
  fname: string;
  /** The command line, arguments joined by spaces, cut to 79 bytes. */
  psargs: string;
}

/** NT_PRPSINFO: struct elf_prpsinfo. */
export function prPsInfo(p: PrPsInfo): Buffer {
  const b = Buffer.alloc(PRPSINFO_BYTES);
  const stateIndex = 'RSDTZW'.indexOf(p.state);
  b.writeInt8(Math.max(stateIndex, 0), 0); // pr_state
  b.write(stateIndex >= 0 ? p.state : '.', 1, 'latin1'); // pr_sname
  b.writeInt8(p.state === 'Z' ? 1 : 0, 2); // pr_zomb
  b.writeInt8(p.nice, 3); // pr_nice (pr_flag at 8: 0)
  b.writeUInt32LE(p.uid >>> 0, 16);
  b.writeUInt32LE(p.gid >>> 0, 20);
  b.writeInt32LE(p.pid, 24);
  b.writeInt32LE(p.ppid, 28);
  b.writeInt32LE(p.pgrp, 32);
  b.writeInt32LE(p.sid, 36);
  cString(p.fname, PR_FNAME_BYTES).copy(b, 40);
  cString(p.psargs, PR_PSARGS_BYTES).copy(b, 40 + PR_FNAME_BYTES);
  return b;
}

/** `text` as UTF-8 cut to size - 1 bytes (never inside a character), NUL-padded to `size`. */
function cString(text: string, size: number): Buffer {
  const out = Buffer.alloc(size);
  let bytes = Buffer.from(text, 'utf8');
  if (bytes.length > size - 1) {
    let end = size - 1;
    while (end > 0 && ((bytes[end] as number) & 0xc0) === 0x80) end--; // a continuation byte: cut before its character
    bytes = bytes.subarray(0, end);
  }
  bytes.copy(out);
  return out;
}

/** NT_SIGINFO: a siginfo_t with si_signo, si_errno, si_code; the rest zero. */
export function sigInfo(signo: number, code = 0, errno = 0): Buffer {
  const b = Buffer.alloc(SIGINFO_BYTES);
  b.writeInt32LE(signo, 0);
  b.writeInt32LE(errno, 4);
  b.writeInt32LE(code, 8);
  return b;
}

/** Where XCR0 sits in an NT_X86_XSTATE buffer: the FXSAVE area's sw_reserved bytes, as ptrace fills them. */
const XSTATE_XCR0_AT = 464;
/** The user state components of the standard (non-compacted) XSAVE layout: XCR0 bit, name, offset, size. */
const XSAVE_COMPONENTS: ReadonlyArray<[bit: number, name: string, offset: number, size: number]> = [
  [1, 'SSE', 160, 256],
  [2, 'AVX (ymm upper halves)', 576, 256],
  [3, 'MPX BNDREGS', 960, 64],
  [4, 'MPX BNDCSR', 1024, 64],
  [5, 'AVX-512 opmask (k0-k7)', 1088, 64],
  [6, 'AVX-512 ZMM_Hi256 (zmm0-15 upper halves)', 1152, 512],
  [7, 'AVX-512 Hi16_ZMM (zmm16-31)', 1664, 1024],
  [9, 'PKRU', 2688, 8],
  [17, 'AMX XTILECFG', 2752, 64],
  [18, 'AMX XTILEDATA', 2816, 8192],
];

/** XCR0 bits of the components above, and x87 (bit 0). */
const KNOWN_XCR0 = XSAVE_COMPONENTS.reduce((mask, [bit]) => mask | (1n << BigInt(bit)), 1n);

/**
 * An NT_X86_XSTATE buffer as gdb reads it: at least as long as the standard
 * layout of the components its XCR0 enables (gdb ignores a shorter one, "too
 * small"). A buffer captured short is padded with zeros; `cut` names the
 * components that were not captured whole (they read as zero). null when the
 * buffer's XCR0 is not one gdb can lay out (x87 or SSE missing, or unknown
 * components): such a note would make gdb refuse the whole core.
 */
export function xstateForCore(xstate: Buffer): { desc: Buffer; cut: string[] } | null {
  if (xstate.length < XSTATE_XCR0_AT + 8) return null;
  const xcr0 = xstate.readBigUInt64LE(XSTATE_XCR0_AT);
  if ((xcr0 & 3n) !== 3n || (xcr0 & ~KNOWN_XCR0) !== 0n) return null;
  let need = 512 + 64; // legacy area + XSAVE header
  const cut: string[] = [];
  for (const [bit, name, offset, size] of XSAVE_COMPONENTS) {
    if ((xcr0 & (1n << BigInt(bit))) === 0n) continue;
    need = Math.max(need, offset + size);
    if (offset + size > xstate.length) cut.push(name);
  }
  if (xstate.length >= need) return { desc: xstate, cut: [] };
  const desc = Buffer.alloc(need);
  xstate.copy(desc);
  return { desc, cut };
}

export interface FileMapping {
  start: bigint;
  end: bigint;
  /** File offset of start, bytes (a multiple of the page size). */
  offset: bigint;
  path: string;
}

/** NT_FILE: count, page size, then {start, end, offset in pages} per mapping, then the NUL-terminated paths. */
export function fileNote(mappings: readonly FileMapping[]): Buffer {
  const names = mappings.map((m) => Buffer.from(`${m.path}\0`, 'utf8'));
  const head = 16 + 24 * mappings.length;
  const b = Buffer.alloc(head + names.reduce((n, name) => n + name.length, 0));
  b.writeBigUInt64LE(BigInt(mappings.length), 0);
  b.writeBigUInt64LE(BigInt(PAGE_SIZE), 8);
  mappings.forEach((m, i) => {
    b.writeBigUInt64LE(m.start, 16 + 24 * i);
    b.writeBigUInt64LE(m.end, 24 + 24 * i);
    b.writeBigUInt64LE(m.offset / BigInt(PAGE_SIZE), 32 + 24 * i);
  });
  let at = head;
  for (const name of names) at += name.copy(b, at);
  return b;
}

export interface LoadSegment {
  vaddr: bigint;
  memsz: bigint;
  /** Bytes of content in the file (0: left out). */
  filesz: number;
  /** Where its content starts in the file. */
  offset: number;
  /** PF_R | PF_W | PF_X */
  flags: number;
}

/** PF_* flags from a /proc maps permission string ("r-xp"). */
export function segmentFlags(perms: string): number {
  return (perms[0] === 'r' ? PF_R : 0) | (perms[1] === 'w' ? PF_W : 0) | (perms[2] === 'x' ? PF_X : 0);
}

/** Where the parts of a core go, given its program header count and note bytes. */
export interface CoreLayout {
  /** Program headers: the PT_NOTE plus one per segment. */
  phnum: number;
  notesOffset: number;
  notesBytes: number;
  /** The first segment's content (page-aligned). */
  dataOffset: number;
}

export function coreLayout(segments: number, notesBytes: number): CoreLayout {
  const phnum = segments + 1;
  const notesOffset = EHDR_BYTES + PHDR_BYTES * phnum;
  return { phnum, notesOffset, notesBytes, dataOffset: align(notesOffset + notesBytes, PAGE_SIZE) };
}

/**
 * The ELF header and the program headers (PT_NOTE first), and with extended
 * numbering the section header that goes at `shoff` (the end of the data).
 */
export function encodeHeaders(layout: CoreLayout, segments: readonly LoadSegment[], shoff: number): { headers: Buffer; sectionHeader: Buffer | null } {
  if (segments.length + 1 !== layout.phnum) throw new RangeError(`${segments.length} segments for ${layout.phnum} program headers`);
  const extended = layout.phnum >= PN_XNUM;
  const h = Buffer.alloc(EHDR_BYTES + PHDR_BYTES * layout.phnum);
  h.write('\x7fELF', 0, 'latin1');
  h[4] = ELFCLASS64;
  h[5] = ELFDATA2LSB;
  h[6] = EV_CURRENT;
  h[7] = ELFOSABI_NONE;
  h.writeUInt16LE(ET_CORE, 16);
  h.writeUInt16LE(EM_X86_64, 18);
  h.writeUInt32LE(EV_CURRENT, 20);
  // e_entry (24): 0
  h.writeBigUInt64LE(BigInt(EHDR_BYTES), 32); // e_phoff
  h.writeBigUInt64LE(BigInt(extended ? shoff : 0), 40); // e_shoff
  // e_flags (48): 0
  h.writeUInt16LE(EHDR_BYTES, 52); // e_ehsize
  h.writeUInt16LE(PHDR_BYTES, 54); // e_phentsize
  h.writeUInt16LE(extended ? PN_XNUM : layout.phnum, 56); // e_phnum
  h.writeUInt16LE(extended ? SHDR_BYTES : 0, 58); // e_shentsize
  h.writeUInt16LE(extended ? 1 : 0, 60); // e_shnum
  // e_shstrndx (62): SHN_UNDEF

  let at = EHDR_BYTES;
  h.writeUInt32LE(PT_NOTE, at);
  // p_flags (4): 0
  h.writeBigUInt64LE(BigInt(layout.notesOffset), at + 8);
  // p_vaddr, p_paddr: 0
  h.writeBigUInt64LE(BigInt(layout.notesBytes), at + 32); // p_filesz (p_memsz 0)
  h.writeBigUInt64LE(4n, at + 48); // p_align
  for (const s of segments) {
    at += PHDR_BYTES;
    h.writeUInt32LE(PT_LOAD, at);
    h.writeUInt32LE(s.flags, at + 4);
    h.writeBigUInt64LE(BigInt(s.offset), at + 8);
    h.writeBigUInt64LE(s.vaddr, at + 16);
    // p_paddr: 0
    h.writeBigUInt64LE(BigInt(s.filesz), at + 32);
    h.writeBigUInt64LE(s.memsz, at + 40);
    h.writeBigUInt64LE(BigInt(PAGE_SIZE), at + 48);
  }
  if (!extended) return { headers: h, sectionHeader: null };
  const sh = Buffer.alloc(SHDR_BYTES); // SHT_NULL; sh_size = e_shnum's real value (0); sh_link = e_shstrndx's (0)
  sh.writeUInt32LE(layout.phnum, 44); // sh_info: the real number of program headers
  return { headers: h, sectionHeader: sh };
}
