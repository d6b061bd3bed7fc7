#!/usr/bin/env bash
# Guards against ptxas silently serializing the wgmmas of the main kernel (it inserts a
# WARPGROUP.DEPBAR after each HGMMA and says nothing): each instantiation must have exactly the
# 6 waits the source asks for (QK^T, P.V x2 per warpgroup). Usage: check_sass.sh BINARY [CUOBJDUMP]
set -euo pipefail
bin=$1
cu=${2:-cuobjdump}
"$cu" --dump-sass "$bin" | awk '
  /Function :/ { f = $3 }
  /WARPGROUP.DEPBAR/ { if (f ~ /decode_main_sm90/) dep[f]++ }
  /HGMMA/ { if (f ~ /decode_main_sm90/) mma[f]++ }
  END {
    bad = 0
    for (k in mma) {
      printf "%-90s HGMMA %3d  WARPGROUP.DEPBAR %3d\n", k, mma[k], dep[k]
      if (dep[k] != 6) bad = 1
    }
    if (bad) { print "FAIL: wgmma serialized (expected 6 DEPBAR per kernel)"; exit 1 }
  }'
