#!/usr/bin/env bash
# Guards against ptxas silently serializing the wgmmas of the decode kernels: it then closes every
# HGMMA's group and waits on it (WARPGROUP.DEPBAR) before the next, and says nothing.
# The wide kernel issues six wgmma batches per pair (QK^T and two P.V per warpgroup), 88 HGMMAs
# in all; the narrow one (both forms, N = 16 and 32) three per page, 68 HGMMAs; the sparse one
# (sm90/decode/sparse) the wide one's six per pair. A healthy build
# has a handful of DEPBAR (one per batch, a few duplicated paths), a serialized one one per HGMMA.
# Usage: check_sass.sh BINARY [CUOBJDUMP]
set -euo pipefail
bin=$1
cu=${2:-cuobjdump}
"$cu" --dump-sass "$bin" | awk '
  /Function :/ { f = $3 }
  f ~ /decode_(wide|narrow|sparse_fp8)_kernel/ && /HGMMA/ { mma[f]++; if (/gsb0/) closed[f]++ }
  f ~ /decode_(wide|narrow|sparse_fp8)_kernel/ && /WARPGROUP.DEPBAR/ { dep[f]++ }
  END {
    bad = 0
    n = 0
    for (k in mma) {
      n++
      printf "%-90s HGMMA %3d  closing %3d  WARPGROUP.DEPBAR %3d\n", k, mma[k], closed[k], dep[k]
      if (dep[k] > 16) bad = 1
    }
    if (n == 0) { print "FAIL: no decode kernel with HGMMA in the binary"; exit 1 }
    if (bad) { print "FAIL: wgmma serialized (a wait after (nearly) every HGMMA)"; exit 1 }
    print "ok: wgmma batches are not serialized"
  }'
