#!/bin/bash
# One wpsnap snapshot of a heartbeat target under perf sched (BENCHMARKS.md, data set L):
#   bench/heartbeat-snapshot.sh CHECKOUT MIB LABEL [wpsnap snapshot options]
# CHECKOUT is a built tree (its dist/cli/main.js is run); the target is this tree's
# fixtures/build/faultlat --workload cache --write-pct 1 --heartbeat, started and ended by its pid.
# Prints the snapshot's figures and the heartbeat's gaps; /tmp/hb-LABEL keeps the perf data.
CLI=$1; MIB=$2; L=$3; shift 3
D=/tmp/hb-$L; rm -rf $D; mkdir -p $D
"$(dirname "$0")/../fixtures/build/faultlat" --mib $MIB --workload cache --write-pct 1 --heartbeat > $D/fl.out 2>&1 &
FL=$!
for i in $(seq 1 600); do grep -q ready $D/fl.out && break; sleep 0.2; done
sleep 2
kill -USR1 $FL; sleep 0.3
perf sched record -o $D/sched.data -- node $CLI/dist/cli/main.js --store $D/store.db snapshot $FL --json "$@" > $D/out.json 2>$D/err.txt
kill -USR2 $FL; sleep 0.5
echo $FL > $D/flpid
kill $FL; wait $FL 2>/dev/null
python3 - $D <<'P'
import json,sys
D=sys.argv[1]
d=json.load(open(D+'/out.json'))
print({k:d.get(k) for k in ['pauseMicros','protectWindowMillis','durableMillis','durationMillis','stagingBytesPeak','stops']})
print('breakdown', d['pauseBreakdownMicros'])
r=json.loads(open(D+'/fl.out').read().strip().split('\n')[-1])
hb=r.get('heartbeat',{})
print('heartbeat max gap ms', hb.get('maxGapNanos',0)/1e6, 'gaps', sorted([(round(g['nanos']/1e6,1), round(g['atMillis'])) for g in hb.get('gaps',[])], key=lambda x:x[1]))
P
