#!/usr/bin/env bash
# Every shapes result suite, in order, on one machine: the two detectors, then the head-only
# sweeps on them, then the joint deformable-pooling pair. Resumable: rerun it and finished runs
# are skipped, interrupted ones resume (train_net.py --resume; the sweep tool), nothing restarts.
# On a 2-core CPU it takes about 8 hours in all; stop it (Ctrl-C) and rerun it at will.
#
#   bash projects/run_shapes_suites.sh            # two runs at a time, one core each
#   PARALLEL=1 bash projects/run_shapes_suites.sh
set -u
cd "$(dirname "$0")/.."
PARALLEL=${PARALLEL:-2}
PYTHON=${PYTHON:-python3}

# The detectors: both at once, one core each (same speed per run as one at a time on both).
detectors=(configs/shapes-partial/mask_rcnn_R_18_FPN_gtcrop.yaml configs/shapes/mask_rcnn_R_18_FPN.yaml)
pids=()
for config in "${detectors[@]}"; do
  output=output/$(basename "$(dirname "$config")")/$(basename "$config" .yaml)
  if [ -f "$output/model_final.pth" ]; then continue; fi
  mkdir -p "$(dirname "$output")"
  OMP_NUM_THREADS=$((PARALLEL > 1 ? 1 : 2)) "$PYTHON" train_net.py --config-file "$config" --resume \
    >> "$output.log" 2>&1 &
  pids+=($!)
  if [ "$PARALLEL" -le 1 ]; then wait "${pids[-1]}"; fi
done
for pid in "${pids[@]}"; do wait "$pid" || exit 1; done

# Cheapest suites first, so a sitting that ends early leaves whole suites behind: the depth suite's
# deep hourglass and paper-size cells cost the most per run, the joint deformable pair the most.
for sweep in projects/shapes-partial-heads/sweep.yaml projects/shapes-full-heads/sweep.yaml \
             projects/shapes-masklab-ablations/sweep.yaml projects/shapes-deep-marc-depth/sweep.yaml \
             projects/shapes-masklab-ablations/deformable.yaml; do
  "$PYTHON" -m masklab_d2.tools.sweep "$sweep" --parallel "$PARALLEL"
  status=$?
  # 130 / 143: stopped by Ctrl-C / SIGTERM (the runs saved their checkpoints): stop here too.
  if [ $status -eq 130 ] || [ $status -eq 143 ]; then exit $status; fi
done
