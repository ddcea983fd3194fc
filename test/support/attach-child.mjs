// A controller that dies mid-attach: `node attach-child.mjs PID POINT`.
// Freezes PID, injects userfaultfd() and takes the fd (as wpsnap's attach
// does), and SIGKILLs itself at POINT (WPSNAP_FAULT: 'after-freeze',
// 'mid-inject': right after asking the tracer helper to inject userfaultfd(),
// or 'after-inject'), never reaching thaw. Uses the compiled code in dist/
// (`npx tsc -p tsconfig.json`). Each step prints one JSON line on stdout,
// written synchronously so that it is out before the SIGKILL.
import { writeSync } from 'node:fs';
import { loadBinding } from '../../dist/core/binding.js';
import { findSyscallInstruction, freeze, injectUserfaultfd } from '../../dist/core/attach.js';
import { faultPoint } from '../../dist/core/fault.js';

const say = (obj) => writeSync(1, JSON.stringify(obj) + '\n');
const [pidArg, point] = process.argv.slice(2);
const pid = Number(pidArg);
if (!Number.isInteger(pid) || pid <= 0 || !['after-freeze', 'mid-inject', 'after-inject'].includes(point)) {
  process.stderr.write('usage: node attach-child.mjs PID after-freeze|mid-inject|after-inject\n');
  process.exit(2);
}
process.env.WPSNAP_FAULT = point;

const binding = loadBinding();
const pidfd = binding.pidfdOpen(pid);
const insn = findSyscallInstruction(binding, pid);
const frozen = freeze(binding, pid);
say({ frozen: true, tids: frozen.threads.map((t) => t.tid) });
faultPoint('after-freeze');
const { fd, method } = injectUserfaultfd(binding, pid, frozen, insn, pidfd, null);
const api = binding.uffdApi(fd, 0n);
say({ injected: true, fd, method, features: '0x' + api.features.toString(16) });
faultPoint('after-inject');
binding.thaw(frozen.handle);
say({ thawed: true });
process.exit(3); // not reached at either point
