#!/usr/bin/env bash
# The mutual-transfer study of issue 32 item 5 (docs/mutual_transfer.md, "Measured"); run it from
# the project root with LOSSATTN_DATA set (the Tiny ImageNet slice). It took about 2 h 40 min
# on 2 cores shared with other work (the last line, CE peers on Tiny ImageNet, 19 min).
# The shipped results were trained by commits 749c0e7 and 478156c, whose maps of bf16
# activations were made in fp32; later code makes them in bf16 (docs/performance.md, "Mutual
# transfer's cost"), so on a bf16 CPU the mutual runs now differ from these at bf16 rounding:
# docs/mutual_transfer.md, "Measured", says by how much for one experiment.
# Every run is trained once (a finished run is reused, an interrupted one resumed) and judged
# once per mask (kept in the run's folder), so the script can be stopped and run again.
set -euo pipefail
PY=${PY:-python}
T="$PY -m engine transfer --quiet --threads 2 --eval-images 100 --random-draws 2"
DIGITS="--dataset digits --train-size 4000 --test-size 1000 --epochs 8 --seeds 0,1,2"
TINY="--dataset tiny_imagenet --epochs 15 --batch-size 64 --seeds 0,1,2"
LA="--peer small_cnn --peer small_cnn"
CE="--peer small_cnn/plain --peer small_cnn/plain"
judge() {  # NAME MASK SETTINGS...: train (or reuse) the runs, judge them under MASK
  local name=$1 mask=$2; shift 2
  local out="results/transfer/$name"; [ "$mask" = black ] || out="$out-mask-$mask"
  $T "$@" --experiment "$name" --mask "$mask" --out "$out"
}
digits() {  # MASK
  judge digits-small-la "$1" $LA --lam 1 $DIGITS
  judge digits-small-la-lam10 "$1" $LA --lam 10 --control digits-small-la $DIGITS
  judge digits-small-ce "$1" $CE --lam 1 $DIGITS
  judge digits-small-ce-lam10 "$1" $CE --lam 10 --control digits-small-ce $DIGITS
}
digits black
judge tiny-imagenet-small-la black $LA --lam 1 $TINY
digits mean
judge tiny-imagenet-small-ce black $CE --lam 1 $TINY
