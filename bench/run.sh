#!/usr/bin/env bash
# Benchmarks nbackup against `tar | pigz` and `tar | zstd -T0` on the 1 GiB tree from
# bench/make-dataset.py. Extra arguments go to bench/bench.py (see --help), e.g.
#   bench/run.sh --rounds 5 --data /var/tmp/nbackup-data --parallels 2
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in tar pigz zstd python3; do
    command -v "$tool" >/dev/null || { echo "bench needs $tool (apt-get install $tool)" >&2; exit 2; }
done
cargo build --release --quiet
exec python3 bench/bench.py --nbackup target/release/nbackup "$@"
