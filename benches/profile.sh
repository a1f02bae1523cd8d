#!/usr/bin/env bash
# Flame graphs of the node and of the bare proxy (the floor) under the benchmark's
# 64-connection load, recorded in the same run: `benches/profile.sh [seconds]` (default 30).
#
# Needs `perf` (Debian: linux-perf) allowed to attach to processes, and inferno
# (`cargo install inferno`). Writes target/profile/{node,bare}.svg, the folded stacks next to
# them, and the benchmark's own table in target/profile/bench.txt. Each process is sampled for
# the whole load phase; it only runs (and is sampled) in its own slices.
set -euo pipefail
cd "$(dirname "$0")/.."
load_seconds="${1:-30}"
out=target/profile
mkdir -p "$out"
for tool in perf inferno-collapse-perf inferno-flamegraph; do
    command -v "$tool" >/dev/null || { echo "profile.sh: $tool is not installed" >&2; exit 1; }
done

bench=$(cargo bench --bench proxy --no-run 2>&1 | tee /dev/stderr | grep -o 'target/release/deps/proxy-[0-9a-f]*' | tail -1)
[ -x "$bench" ] || { echo "profile.sh: benchmark binary not found" >&2; exit 1; }

"$bench" --connections 64 --seconds "$load_seconds" >"$out/bench.txt" 2>&1 &
bench_pid=$!
node="" bare=""
for _ in $(seq 300); do
    node=$(pgrep -P "$bench_pid" -f 'routstr-node$' || true)
    bare=$(pgrep -P "$bench_pid" -f -- '--bare-proxy' || true)
    [ -n "$node" ] && [ -n "$bare" ] && break
    sleep 0.2
done
[ -n "$node" ] && [ -n "$bare" ] || { echo "profile.sh: the node or the bare proxy did not start" >&2; exit 1; }

record() { # pid name
    perf record -q -e cpu-clock -F 997 --call-graph dwarf,16384 -o "$out/$2.data" -p "$1" -- sleep "$load_seconds" 2>/dev/null
}
record "$node" node &
node_perf=$!
record "$bare" bare &
bare_perf=$!
wait "$node_perf" "$bare_perf" || true
wait "$bench_pid"

for name in node bare; do
    perf script -i "$out/$name.data" 2>/dev/null | inferno-collapse-perf >"$out/$name.folded"
    inferno-flamegraph --title "$name, 64 connections" <"$out/$name.folded" >"$out/$name.svg"
    rm -f "$out/$name.data"
done
grep -E '^\|' "$out/bench.txt" || true
echo "flame graphs: $out/node.svg $out/bare.svg"
