// `wpsnap serve`: wait for processes that run the cooperative agent
// (LD_PRELOAD=libwpsnap-agent.so WPSNAP_SOCKET=PATH, or linked in) to connect,
// then snapshot them together at one instant (core/group.ts), and exit.
import { AgentServer } from '../../core/agent-server.js';
import { println, type CommandContext } from '../context.js';
import { numberOption, positiveInteger, snapshotName } from '../args.js';
import { defineCommand } from './types.js';
import { runGroupSnapshot } from './snapshot-group.js';
import { defaultPriority } from './snapshot.js';

export const serveCommand = defineCommand({
  command: 'serve',
  describe: 'Wait for N processes running the wpsnap agent to connect to a socket, snapshot them together at one instant, and exit',
  builder: (y) =>
    y
      .option('socket', {
        type: 'string',
        demandOption: true,
        describe: "the agents' WPSNAP_SOCKET: a unix socket made 0600, in a directory private to this user (created 0700 if missing)",
      })
      .option('expect', { type: 'string', demandOption: true, describe: 'how many agents to wait for', coerce: positiveInteger('a number of agents') })
      .option('timeout', { type: 'string', default: '60', describe: 'seconds to wait for them (then: an error, and the agents that came are let go)', coerce: numberOption('timeout', 'seconds') })
      .option('name', { type: 'string', describe: 'a unique name to refer to the snapshot by', coerce: snapshotName }),
  async handler(args, ctx: CommandContext) {
    // As `wpsnap snapshot`: $WPSNAP_PRIORITY, else idle; checked before any agent waits on us.
    const priority = defaultPriority(ctx.env['WPSNAP_PRIORITY']);
    const binding = ctx.binding();
    const store = await ctx.openStore(args.store);
    let server: AgentServer | undefined;
    try {
      server = AgentServer.listen(binding, args.socket);
      println(ctx.stderr, `wpsnap: waiting for ${args.expect} agent${args.expect === 1 ? '' : 's'} at ${args.socket}`);
      const members = await server.waitForAgents(args.expect, args.timeout * 1000, (line) => println(ctx.stderr, `wpsnap: ${line}`), {
        signal: ctx.signal,
        onJoined: (m) => println(ctx.stderr, `wpsnap: agent joined: pid ${m.pid} (${m.comm}, ${m.linked ? 'linked' : 'preloaded'}, uid ${m.uid})`),
      });
      await runGroupSnapshot(
        ctx,
        binding,
        store,
        members.map((m) => ({ pid: m.pid, attacher: m.attacher })),
        {
          ...(args.name === undefined ? {} : { name: args.name }),
          priority,
          signal: ctx.signal,
          json: args.json,
        },
        null,
      );
    } finally {
      // DONE to every agent, then the socket goes.
      server?.close();
      await store.close();
    }
  },
});
