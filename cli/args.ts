// Argument checks that run inside yargs' parse (as `coerce`), so that a bad
// value is a usage error before any handler runs, and the message echoes what
// was given.
import { usageError } from '../common/errors.js';

function given(raw: unknown): string {
  return JSON.stringify(raw === undefined || raw === '' ? '' : String(raw));
}

/** A positive integer such as a pid: `what` names it in the error ("not a pid: "abc""). */
export function positiveInteger(what: string): (raw: unknown) => number {
  return (raw) => {
    const text = String(raw).trim();
    const n = /^\d+$/.test(text) ? Number(text) : NaN;
    if (!Number.isSafeInteger(n) || n <= 0) throw usageError(`not ${what}: ${given(raw)}`);
    return n;
  };
}

/** A number > 0 (or >= 0 with allowZero) for an option: the error names the option and echoes the value. */
export function numberOption(option: string, unit: string, { allowZero = false } = {}): (raw: unknown) => number {
  return (raw) => {
    const text = String(raw).trim();
    const n = text === '' ? NaN : Number(text);
    if (!Number.isFinite(n) || n < 0 || (n === 0 && !allowZero)) {
      throw usageError(`--${option} must be a ${allowZero ? 'non-negative' : 'positive'} number of ${unit}, not ${given(raw)}`);
    }
    return n;
  };
}

/**
 * yargs' own validation messages as one line that names the option:
 * "Invalid values:\n  Argument: format, Given: "elf", Choices: "raw"" becomes
 * `invalid value "elf" for --format (choices: "raw")`.
 */
export function usageMessage(message: string, argv: readonly string[], command: { name: string; positionals: string[] } | undefined): string {
  const unknown = /^Unknown arguments?: (.*)$/s.exec(message);
  if (unknown) {
    const names = unknown[1]!.split(', ').map((n) => (argv.includes(`--${n}`) || argv.some((a) => a.startsWith(`--${n}=`)) ? `--${n}` : argv.includes(`-${n}`) ? `-${n}` : n));
    return `unknown ${names.every((n) => n.startsWith('-')) ? 'option' : 'argument'}${names.length > 1 ? 's' : ''}: ${names.join(', ')}`;
  }
  if (message.startsWith('Invalid values:')) {
    const parts = [...message.matchAll(/Argument: (\S+), Given: (.*?), Choices: (.*)$/gm)].map(
      ([, name, value, choices]) => `invalid value ${value!.trim()} for --${name} (choices: ${choices!.trim()})`,
    );
    if (parts.length > 0) return parts.join('; ');
  }
  if (message.startsWith('Not enough non-option arguments') && command) {
    const missing = command.positionals.map((p) => `<${p}>`).join(' ');
    return `missing ${missing}: wpsnap ${command.name} ${missing}`;
  }
  const required = /^Missing required arguments?: ([^\n]*)\n(.+)$/s.exec(message);
  if (required) return required[2]!.trim().split('\n').join('; ');
  return message.replace(/\s*\n\s*/g, ' ').trim();
}

/** A duration such as "1s", "250ms", "500us", "2m" or a bare number of seconds, in milliseconds (> 0). */
export function durationOption(option: string): (raw: unknown) => number {
  return (raw) => {
    const m = /^(\d+(?:\.\d+)?)\s*(us|µs|ms|s|m|h)?$/.exec(String(raw).trim());
    const scale = { us: 0.001, µs: 0.001, ms: 1, s: 1000, m: 60_000, h: 3_600_000 }[(m?.[2] ?? 's') as 'us' | 'µs' | 'ms' | 's' | 'm' | 'h'];
    const ms = m ? Number(m[1]) * scale : NaN;
    if (!Number.isFinite(ms) || ms <= 0) throw usageError(`--${option} must be a positive duration such as 500ms, 1s or 2m, not ${given(raw)}`);
    return ms;
  };
}

/** --name of a new snapshot: any string but a number (numbers are snapshot ids). */
export function snapshotName(name: string): string {
  if (/^\d+$/.test(name)) throw usageError(`--name must not be a number (numbers are snapshot ids): "${name}"`);
  return name;
}
