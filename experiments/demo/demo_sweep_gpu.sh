#!/usr/bin/env bash
# The sweep behind docs/demo.md's "longer training" table: the demo's methods and variants trained for hundreds of
# steps on one GPU, every run in its own process (a 135M model leaves the GPU mostly idle, so runs share it), scored
# on the VALID split only (experiments/demo/demo_investigation.py). Rows merge into OUT_DIR/sweep.json.
#   python experiments/demo/demo_investigation.py --prepare-only --data DATA/d480 --valid-pairs 600
#   python experiments/demo/demo_investigation.py --prepare-only --data DATA/d3000 --train-pairs 3000 --valid-pairs 600
#   bash experiments/demo/demo_sweep_gpu.sh DATA OUT_DIR [SECONDS] [WAVE]
# SECONDS (default 300) bounds the whole sweep; each run writes its rows as it goes, so a cut keeps what was measured.
# WAVE 1 (default): hundreds of steps, the variants of the first investigation, 480 and 3000 training pairs;
# WAVE 2: budgets a 2-core CPU can afford (batch 4, 50-150 steps; larger learning rates) and a second training seed.
# WAVE 3: the paper's router vs fast conditioning (without and with the centred profile input, the demo's) on the
# demo's zones population at 40 and 300 steps (docs/demo.md).
# (Waves 1 and 2 name the variants of the 2026-11-28 investigation; "base" is today's "paper".)
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?data root holding d480/ and d3000/}
OUT_DIR=${2:?output folder}
LIMIT=${3:-300}
WAVE=${4:-1}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

# convert the embedded model once before the runs start (they would all convert it at the same time)
$PY -c "from cuma.models import load_base_and_tokenizer as f; f('smollm2-135m')" || exit 1

launch() {  # name data steps eval_at variant:method [more demo_investigation options]
    local name=$1 data=$2 steps=$3 at=$4 run=$5
    shift 5
    timeout "$LIMIT" $PY experiments/demo/demo_investigation.py --data "$DATA/$data" --steps "$steps" --eval-at "$at" \
        --runs "$run" --work "$OUT_DIR/work_$name" --json "$OUT_DIR/rows_$name.json" "$@" >"$OUT_DIR/$name.log" 2>&1 &
}
if [ "$WAVE" = 3 ]; then
    # docs/demo.md section 6: the paper's router against fast conditioning on the demo's population, at the demo's
    # budget and at 300 steps (linear schedule over each run, the demo's learning rates), valid split.
    #   python experiments/demo/demo_investigation.py --prepare-only --data DATA/demo --valid-pairs 300
    for steps in 40 300; do
        launch "d_paper_$steps" demo $steps $steps lin_paper_lr2e-3:cuma --valid-limit 200
        launch "d_fast_$steps" demo $steps $steps lin_fast_lr2e-3:cuma --valid-limit 200
        launch "d_fastc_$steps" demo $steps $steps lin_fastc_lr2e-3:cuma --valid-limit 200
        launch "d_lora_$steps" demo $steps $steps lin_lr1e-3:lora --valid-limit 200
    done
    wait
    WAVE=done
fi
if [ "$WAVE" = 2 ]; then
    for m in lora cuma-semantic cuma; do
        launch "c_b4_$m" d480 150 50,75,100,150 "b4lr2e-3:$m"
        launch "c_lr1_$m" d480 100 40,60,100 "lr1e-3:$m"
    done
    launch c_lr2_sem d480 100 60,100 lr2e-3:cuma-semantic
    launch c_seed1_lora d480 300 100,300 base:lora --seed 1
    launch c_seed1_cuma d480 300 100,300 base:cuma --seed 1
    wait
    WAVE=done
fi
S480=300 E480=30,100,300
S3000=600 E3000=100,300,600
[ "$WAVE" = 1 ] && {
launch a_lora d480 $S480 $E480 base:lora
launch a_sem d480 $S480 $E480 base:cuma-semantic
launch a_cuma d480 $S480 $E480 base:cuma
launch a_noprompt d480 $S480 $E480 noprompt:cuma
launch a_binit d480 $S480 $E480 binit:cuma
launch a_router d480 $S480 $E480 router5e-3:cuma
launch a_lr_lora d480 $S480 $E480 lr2e-3:lora
launch a_lr_cuma d480 $S480 $E480 lr2e-3:cuma
launch b_lora d3000 $S3000 $E3000 base:lora
launch b_sem d3000 $S3000 $E3000 base:cuma-semantic
launch b_cuma d3000 $S3000 $E3000 base:cuma
launch b_noprompt d3000 $S3000 $E3000 noprompt:cuma
wait
}

$PY - "$OUT_DIR" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = []
for f in sorted(out.glob("rows_*.json")):
    rows += json.loads(f.read_text())
(out / "sweep.json").write_text(json.dumps(rows, indent=2))
print(f"{'seed':>4} {'data':>5} {'variant':>10} {'method':>14} {'step':>5} {'acc':>6} {'emd':>6} {'emdE':>6} {'ent':>6} {'spread':>7}")
for r in rows:
    print(f"{r.get('seed', 0):>4} {r['train_pairs']:>5} {r['variant']:>10} {r['method']:>14} {r['step']:>5} {100 * r['accuracy']:6.1f} "
          f"{r['emd']:6.3f} {r.get('emd_expected', float('nan')):6.3f} {r['entropy']:6.3f} {r.get('load_spread', float('nan')):7.4f}")
EOF
