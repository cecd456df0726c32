#!/bin/bash
# One GPU machine, ~10 minutes: benchmarks/trained_bottle.py (EfficientAD, GLASS, REB next to PatchCore,
# 1/4/full shots x 3 seeds) as parallel processes, one per method and shot count, plus ablation rows.
# Each fit is capped in time (preset gpu), so contention between the processes lowers the step counts
# (printed in the table). Inputs, made here beforehand and copied along with the tree:
#   python benchmarks/resized_copy.py ../shared/data/mvtec_ad .devdata/mvtec_ad --category bottle --size 256
#   python benchmarks/supervised_bottle.py --pmf-export .pmfbundle      # lite0.pth: the offline weights
# Run: OUT=results/ bash benchmarks/device_trained.sh   (QUICK=1 for a CPU smoke with tiny budgets;
# PRESET=paper for EfficientAD at the paper's 70k steps, one seed at full shot)
set -u
export PYTHONUNBUFFERED=1 FSAD_HOME=/tmp/fsadhome OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PY=${PY:-python3}
ROOT=${ROOT:-.devdata/mvtec_ad}
W=${WEIGHTS:-$PWD/.pmfbundle/lite0.pth}
ART=/tmp/fsad-art
T=${T:-540}
FINAL=$OUT; OUT=/tmp/fsad-out; mkdir -p $OUT  # at most 8 files come back: all rows go into one archive
if [ "${PRESET:-}" = paper ]; then  # EfficientAD alone on the GPU at the paper's budget
  $PY benchmarks/trained_bottle.py --root $ROOT --weights $W --preset paper --artifacts $ART --seeds 0 --methods efficientad \
    --shots full --no-patchcore --json $FINAL/paper.json 2>&1 | tee $FINAL/paper.log; exit; fi
if [ "${QUICK:-0}" = 1 ]; then PRESET=quick; SEEDS="0"; SHOTS="1 full"; else
  PRESET=gpu; SEEDS="0 1 2"; SHOTS="1 4 full"; fi
nvidia-smi -L 2>/dev/null; $PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())"
TB="$PY benchmarks/trained_bottle.py --root $ROOT --weights $W --preset $PRESET --artifacts $ART --seeds $SEEDS"
# REB (+ the PatchCore reference rows, own feature store each) and GLASS: one process per shot count
for s in $SHOTS; do timeout $T $TB --methods reb --shots $s --store /tmp/store_$s --json $OUT/t_reb_$s.json > $OUT/t_reb_$s.log 2>&1 & done
for s in $SHOTS; do timeout $T $TB --methods glass --shots $s --no-patchcore --json $OUT/t_glass_$s.json > $OUT/t_glass_$s.log 2>&1 & done
[ "${QUICK:-0}" = 1 ] || timeout $T $TB --methods glass --shots full --no-patchcore --param glass.lr=0.001 --tag lr1e-3 --json $OUT/t_glasslr.json > $OUT/t_glasslr.log 2>&1 &
# EfficientAD: the shared generic teacher first, then one process per shot count
timeout $T $TB --prepare --methods efficientad > $OUT/t_ead_teacher.log 2>&1
for s in $SHOTS; do timeout $((T - SECONDS)) $TB --methods efficientad --shots $s --no-patchcore --json $OUT/t_ead_$s.json > $OUT/t_ead_$s.log 2>&1 & done
# ablation: EfficientAD with the teacher distilled on the support images (the earlier default)
[ "${QUICK:-0}" = 1 ] || timeout $((T - SECONDS)) $TB --methods efficientad --shots full --no-patchcore --param efficientad.teacher='"support"' --tag support --json $OUT/t_eadsup.json > $OUT/t_eadsup.log 2>&1 &
wait
$PY benchmarks/trained_bottle.py --table-from $OUT/t_*.json | tee $OUT/trained_table.txt
tail -n 3 $OUT/*.log
cp $OUT/trained_table.txt $FINAL/; tar czf $FINAL/rows_and_logs.tgz -C $OUT .
