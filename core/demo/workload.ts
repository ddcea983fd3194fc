// The demo's workload: pagewriter (core/demo/pagewriter.c, built by npm install
// as build/Release/wpsnap_demo_writer), threads writing step-coded pages at
// full speed into anonymous, memfd and kernel-written memory, whose content at
// any instant follows from its counters (core/demo/oracle.ts).
import { dirname, join } from 'node:path';
import { nativeAddonPath } from '../binding.js';
import { launchProgram, type LaunchedProgram } from './launch.js';

export function demoWriterPath(): string {
  return join(dirname(nativeAddonPath()), 'wpsnap_demo_writer');
}

/** Start the workload (not as our child) and wait until it is writing. */
export function launchDemoWorkload(args: string[]): Promise<LaunchedProgram> {
  return launchProgram(demoWriterPath(), args);
}
