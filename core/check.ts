// What this machine and these privileges allow, and why not where they don't.
import { accessSync, constants, existsSync, readFileSync } from 'node:fs';
import { tracerHelperPath } from './binding.js';
import type { NativeBinding } from './native/binding.js';
import { FEATURE_PURPOSE, UFFD_FEATURE, missingFeatures } from './features.js';

export interface CheckItem {
  name: string;
  ok: boolean;
  /** What was found, or why it is not available. */
  detail: string;
  /** Whether a snapshot needs it (false: only some targets or later features do). */
  required: boolean;
}

export interface CheckReport {
  kernel: string;
  canSnapshot: boolean;
  items: CheckItem[];
}

function readOr(path: string, fallback: string): string {
  try {
    return readFileSync(path, 'utf8').trim();
  } catch {
    return fallback;
  }
}

function hasCapability(bit: bigint): boolean {
  const capEff = /^CapEff:\s+([0-9a-f]+)/m.exec(readOr('/proc/self/status', ''))?.[1] ?? '0';
  return ((BigInt('0x' + capEff) >> bit) & 1n) === 1n;
}

export function checkEnvironment(loadBinding: () => NativeBinding): CheckReport {
  const items: CheckItem[] = [];
  const kernel = readOr('/proc/sys/kernel/osrelease', 'unknown');
  const add = (name: string, ok: boolean, detail: string, required = true): void => {
    items.push({ name, ok, detail, required });
  };

  const platformOk = process.platform === 'linux' && process.arch === 'x64';
  add('platform', platformOk, `${process.platform}/${process.arch}${platformOk ? '' : ' (wpsnap needs linux/x64)'}`);

  let binding: NativeBinding | undefined;
  try {
    binding = loadBinding();
    add('native addon', true, 'loaded');
  } catch (error) {
    add('native addon', false, (error as Error).message);
  }

  const helper = tracerHelperPath();
  let helperOk = true;
  try {
    accessSync(helper, constants.X_OK);
  } catch {
    helperOk = false;
  }
  add('tracer helper', helperOk, helperOk ? `${helper} (freezes targets in a process of its own)` : `${helper} is missing or not executable (run npm install)`);

  const root = process.getuid?.() === 0;
  const ptraceCap = hasCapability(19n);
  add('ptrace', ptraceCap, ptraceCap ? `CAP_SYS_PTRACE held${root ? ' (root)' : ''}: any process can be frozen` : 'CAP_SYS_PTRACE missing: run as root to freeze other users\' processes');
  const yama = readOr('/proc/sys/kernel/yama/ptrace_scope', '');
  if (yama !== '') add('yama ptrace_scope', yama !== '3' && (yama === '0' || ptraceCap), `ptrace_scope=${yama}${yama === '3' ? ' forbids all attaching' : ''}`);
  const pidfdGetfd = ptraceCap;
  add('pidfd_getfd', pidfdGetfd, pidfdGetfd ? 'may take a userfaultfd from a target' : 'needs ptrace rights over the target');

  if (binding) {
    try {
      const features = binding.probeUffd().features;
      add('userfaultfd', true, `available, UFFDIO_API features 0x${features.toString(16)}`);
      const missing = new Set(missingFeatures(features));
      for (const [name, bit] of Object.entries(UFFD_FEATURE) as Array<[keyof typeof UFFD_FEATURE, bigint]>) {
        const has = (features & bit) !== 0n;
        const required = missing.has(name) || ['PAGEFAULT_FLAG_WP', 'EVENT_REMAP', 'EVENT_REMOVE', 'EVENT_UNMAP', 'WP_HUGETLBFS_SHMEM', 'WP_UNPOPULATED'].includes(name);
        add(`UFFD_FEATURE_${name}`, has, `${has ? 'yes' : 'NO'}: ${FEATURE_PURPOSE[name]}`, required);
      }
    } catch (error) {
      const code = (error as { code?: string }).code;
      add('userfaultfd', false, code === 'EPERM' ? 'not permitted for this user (vm.unprivileged_userfaultfd=0): run as root' : code === 'ENOSYS' ? 'kernel built without CONFIG_USERFAULTFD' : (error as Error).message);
    }
    const scan = binding.probePagemapScan();
    add('PAGEMAP_SCAN', scan === 0, scan === 0 ? 'ioctl works (Linux 6.7+): finds the populated pages of large sparse mappings, to protect only those' : `ioctl fails with errno ${scan}`, false);
  }

  const unprivileged = readOr('/proc/sys/vm/unprivileged_userfaultfd', '0');
  const dev = existsSync('/dev/userfaultfd');
  add(
    'non-root targets',
    unprivileged === '1' || (dev && root),
    unprivileged === '1'
      ? 'vm.unprivileged_userfaultfd=1: targets call userfaultfd(2) themselves'
      : dev
        ? 'vm.unprivileged_userfaultfd=0: wpsnap lends the target a private /dev/userfaultfd node for the attach'
        : 'vm.unprivileged_userfaultfd=0 and no /dev/userfaultfd: only targets with CAP_SYS_PTRACE can be snapshotted',
    false,
  );
  const pfnVisible = root || hasCapability(21n);
  add('pagemap PFNs', pfnVisible, pfnVisible ? 'visible: races with MADV_DONTNEED are detected exactly' : 'hidden without CAP_SYS_ADMIN', true);
  const huge = readOr('/proc/sys/vm/nr_hugepages', '0');
  add('hugetlb pages', true, `${huge} reserved 2 MiB pages (hugetlbfs targets are supported)`, false);

  const canSnapshot = items.every((i) => i.ok || !i.required);
  return { kernel, canSnapshot, items };
}
