#!/bin/bash
# One GPU machine, ~2-3 minutes: the P>M>F grid of benchmarks/supervised_bottle.py (both label modes x 10
# good:bad settings x 5 seeds), one process per (label mode, setting), rows tarred into $OUT every 15 s.
# Input, made here beforehand and copied along with the tree:
#   python benchmarks/supervised_bottle.py --pmf-export .pmfbundle
# Table: python benchmarks/supervised_bottle.py --table-from <rows>/pmf_*.csv [other rows.csv]
set -u
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
T=${T:-150}; W=/tmp/pmf; mkdir -p $W
for mode in binary multiclass; do for c in g1b1 g1b2 g1b5 g2b1 g2b2 g2b5 g5b1 g5b2 g5b5 g10b1; do
  timeout $T python3 benchmarks/supervised_bottle.py --pmf-bundle .pmfbundle --device cuda --rows $W/pmf_${mode}_$c.csv \
    --pmf-modes $mode --pmf-configs $c --pmf-seeds 5 --pmf-steps 50 --pmf-budget 60 > $W/pmf_${mode}_$c.log 2>&1 &
done; done
PIDS=$(jobs -p)
(while sleep 15; do tar czf $OUT/rows.tgz.tmp -C $W . && mv $OUT/rows.tgz.tmp $OUT/rows.tgz; done) &
LOOP=$!
wait $PIDS; kill $LOOP
tar czf $OUT/rows.tgz -C $W .
python3 benchmarks/supervised_bottle.py --table-from $W/pmf_*.csv
grep -h "^# pmf" $W/*.log
