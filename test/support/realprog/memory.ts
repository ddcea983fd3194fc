// Reading a raw export (manifest.json + one file per region) and a live
// process's memory, and checking the "marker" buffers the real-program
// scripts keep (fixtures/realprog/pyheap.py, nodeheap.mjs):
//
//   header (16 B) | begin u64 | end u64 | records (k, i) u64 pairs, i = 0, 1, ...
//
// written begin = k, records, end = k at every step k.
import { closeSync, openSync, readFileSync, readSync } from 'node:fs';
import { join } from 'node:path';
import type { NativeBinding } from '../../../core/binding.js';
import type { RawManifest, RawManifestRegion } from '../../../snapshot-format/export-raw.js';

export function readManifest(dir: string): RawManifest {
  return JSON.parse(readFileSync(join(dir, 'manifest.json'), 'utf8')) as RawManifest;
}

export function manifestRegions(manifest: RawManifest, pid: number): RawManifestRegion[] {
  const proc = manifest.processes.find((p) => p.pid === pid);
  if (!proc) throw new Error(`the export holds no process ${pid} (it holds ${manifest.processes.map((p) => p.pid).join(', ')})`);
  return proc.regions;
}

export function regionAt(regions: RawManifestRegion[], address: bigint): RawManifestRegion | undefined {
  return regions.find((r) => BigInt(r.start) <= address && address < BigInt(r.end));
}

/** `length` bytes at `address` of the exported image (from the region file that holds them). */
export function readExported(dir: string, regions: RawManifestRegion[], address: bigint, length: number): Buffer {
  const region = regionAt(regions, address);
  if (!region) throw new Error(`no exported region holds 0x${address.toString(16)}`);
  if (region.file === null) throw new Error(`region ${region.start}-${region.end} (${region.path}) was not exported: ${region.skipReason ?? region.capture}`);
  if (address + BigInt(length) > BigInt(region.end)) throw new Error(`0x${address.toString(16)}+${length} crosses the end of region ${region.end}`);
  const fd = openSync(join(dir, region.file), 'r');
  try {
    const out = Buffer.alloc(length);
    const n = readSync(fd, out, 0, length, Number(address - BigInt(region.start)));
    if (n !== length) throw new Error(`short read of ${region.file}: ${n} of ${length} bytes`);
    return out;
  } finally {
    closeSync(fd);
  }
}

/** Every offset of `needle` in `hay`. */
export function offsetsOf(hay: Buffer, needle: Buffer): number[] {
  const found: number[] = [];
  for (let i = hay.indexOf(needle); i >= 0; i = hay.indexOf(needle, i + 1)) found.push(i);
  return found;
}

interface LiveRegion {
  start: bigint;
  end: bigint;
  perms: string;
  path: string;
}

export function liveMaps(pid: number): LiveRegion[] {
  return readFileSync(`/proc/${pid}/maps`, 'utf8')
    .split('\n')
    .filter((l) => l.length > 0)
    .map((l) => {
      const m = /^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \S+\s*(.*)$/.exec(l);
      if (!m) throw new Error(`unparsable maps line: ${l}`);
      return { start: BigInt('0x' + m[1]), end: BigInt('0x' + m[2]), perms: m[3]!, path: m[4]! };
    });
}

/** Addresses of `needle` in the live process's private writable anonymous memory (read with process_vm_readv). */
export function findInProcess(binding: NativeBinding, pid: number, needle: Buffer): bigint[] {
  const found: bigint[] = [];
  const CHUNK = 16n << 20n;
  for (const r of liveMaps(pid)) {
    if (r.perms !== 'rw-p' || !(r.path === '' || r.path === '[heap]')) continue;
    for (let a = r.start; a < r.end; a += CHUNK) {
      // Overlap the next chunk by needle.length - 1 bytes so no match is split.
      const stop = a + CHUNK + BigInt(needle.length - 1);
      const len = Number((stop < r.end ? stop : r.end) - a);
      let data: Buffer;
      try {
        data = binding.processVmRead(pid, a, len);
      } catch {
        continue; // unmapped meanwhile
      }
      for (const off of offsetsOf(data, needle)) found.push(a + BigInt(off));
    }
  }
  return [...new Set(found)];
}

export interface MarkerCheck {
  /** The step whose records the marker holds (begin); the torn case holds begin or begin - 1 byte by byte. */
  step: bigint;
  torn: boolean;
  /** Empty when the marker is exactly what one instant of the program's steps allows. */
  problems: string[];
}

/** The marker's records at step k, from offset 32 to `length`. */
export function markerRecords(k: bigint, length: number): Buffer {
  const out = Buffer.alloc(length - 32);
  for (let i = 0; i * 16 < out.length; i++) {
    out.writeBigUInt64LE(k, i * 16);
    out.writeBigUInt64LE(BigInt(i), i * 16 + 8);
  }
  return out;
}

export function checkMarker(marker: Buffer, header: Buffer): MarkerCheck {
  const problems: string[] = [];
  if (!marker.subarray(0, 16).equals(header)) problems.push(`header ${marker.subarray(0, 16).toString('hex')} is not ${header.toString('hex')}`);
  const begin = marker.readBigUInt64LE(16);
  const end = marker.readBigUInt64LE(24);
  const records = marker.subarray(32);
  const now = markerRecords(begin, marker.length);
  if (begin === end) {
    if (!records.equals(now)) {
      const bad = firstDifference(records, now);
      problems.push(`step ${begin} complete but record byte ${bad} is ${records[bad]} not ${now[bad]}`);
    }
    return { step: begin, torn: false, problems };
  }
  if (begin !== end + 1n) {
    problems.push(`begin ${begin} and end ${end} are not one step apart`);
    return { step: begin, torn: true, problems };
  }
  const before = markerRecords(end, marker.length);
  for (let i = 0; i < records.length; i++) {
    if (records[i] !== now[i] && records[i] !== before[i]) {
      problems.push(`torn step ${begin}: record byte ${i} is ${records[i]}, neither step ${begin} (${now[i]}) nor ${end} (${before[i]})`);
      break;
    }
  }
  return { step: begin, torn: true, problems };
}

function firstDifference(a: Buffer, b: Buffer): number {
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return i;
  return -1;
}
