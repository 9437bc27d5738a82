#!/usr/bin/env bash
# The README's test command, RUNS times in a row from a fresh clone of this checkout, the last BUSY of them with
# every core kept busy by other processes for the whole run: the suite must not depend on how fast the machine is.
#   bash scripts/test_under_load.sh            # 5 runs, 2 of them with both cores busy
#   RUNS=2 BUSY=1 bash scripts/test_under_load.sh
set -uo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-5} busy=${BUSY:-2}
clone=$(mktemp -d)/backdrop logs=$(mktemp -d)
git clone -q . "$clone" && ln -s "$(pwd)/../shared" "$(dirname "$clone")/shared"
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$(dirname "$clone")"' EXIT
for run in $(seq 1 "$runs"); do
    loaders=()
    if [ "$run" -gt $((runs - busy)) ]; then
        for _ in $(seq 1 "$(nproc)"); do python3 -c "while True: pass" & loaders+=($!); done
    fi
    started=$(date +%s)
    (cd "$clone" && bash .ci/run) > "$logs/run$run.log" 2>&1
    status=$?
    if [ ${#loaders[@]} -gt 0 ]; then kill "${loaders[@]}"; wait "${loaders[@]}" 2>/dev/null; fi
    summary=$(grep -E "^CI: [0-9]+ passed" "$logs/run$run.log" | tail -1)
    pytest_time=$(grep -oE "in [0-9.]+s \([0-9:]+\)" "$logs/run$run.log" | tail -1)
    echo "run $run (busy cores: ${#loaders[@]}): exit $status in $(( $(date +%s) - started )) s" \
        "(pytest ${pytest_time:-?}); ${summary:-no summary}"
done
echo "logs: $logs"
