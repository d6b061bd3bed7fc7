#!/usr/bin/env bash
# Compares the machine code of the shipped kernels in two binaries (the extension module, a tool,
# any ELF with sm_90a code): a change meant to leave the device code alone must print
# "identical" for every kernel. Kernels are matched by role, so renames, moves between files and
# the element-type template argument (bf16, or none before f16 existed) do not count:
#   sched     sched_kernel                 combine   combine_kernel<bf16>
#   wide      decode_wide_kernel<bf16> (was decode_main_sm90_kernel)
#   narrow16  decode_narrow_kernel<16, bf16>     narrow32  decode_narrow_kernel<32, bf16>
#             (were decode_narrow_sm90_kernel<16|32>)
# The f16 and FP8-cache instantiations have roles of their own (wide_f16, wide_fp8, ...): compared
# when both binaries have them, listed otherwise.
# Per kernel, the instruction stream with its encodings (so scheduling control bits count too)
# is compared after dropping each line's address column (branch targets are offsets inside the
# function and stay), then the resource usage (registers, shared memory, parameter constants).
# Usage: compare_sass.sh OLD NEW [CUOBJDUMP]   (exit 0 only if all five are identical)
set -euo pipefail
old=$1
new=$2
cu=${3:-cuobjdump}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The role of a function from its mangled name (the anonymous namespace's hash, which names the
# file, and the namespace are ignored); an unknown kernel keeps its name.
role_awk='
  function role(name,   r) {
    r = ""
    if (name ~ /sched_kernel/) r = "sched"
    if (name ~ /combine_kernel/) r = "combine"
    if (name ~ /decode_(main_sm90|wide)_kernel/) r = "wide"
    if (name ~ /decode_narrow(_sm90)?_kernelILi16E/) r = "narrow16"
    if (name ~ /decode_narrow(_sm90)?_kernelILi32E/) r = "narrow32"
    if (r == "") return name
    if (name ~ /Fp8TensorMaps/) return r "_fp8"
    return name ~ /6__half/ ? r "_f16" : r
  }'

# One file per role under $2: instruction lines, address column dropped, spaces folded; and one
# resource line per role.
split_sass() {
  mkdir -p "$2"
  "$cu" --dump-sass "$1" | awk -v dir="$2" "$role_awk"'
    /Function :/ { f = dir "/" role($3) ".sass"; next }
    /^[[:space:]]*(Fatbin|=====|arch|code version|host|compile_size|identifier|code for)/ {
      f = ""; next }
    f != "" && NF > 0 {
      sub(/^[[:space:]]*\/\*[0-9a-f]+\*\//, "")
      gsub(/[[:space:]]+/, " ")
      print > f
    }'
  "$cu" --dump-resource-usage "$1" | awk -v dir="$2" "$role_awk"'
    /^ Function / { name = $2; sub(/:$/, "", name); getline; print > (dir "/" role(name) ".res") }'
}

split_sass "$old" "$work/old"
split_sass "$new" "$work/new"

status=0
roles="sched wide narrow16 narrow32 combine"
for k in wide_f16 narrow16_f16 narrow32_f16 combine_f16 wide_fp8 narrow16_fp8 narrow32_fp8; do
  if [ -s "$work/old/${k}.sass" ] && [ -s "$work/new/${k}.sass" ]; then
    roles="$roles ${k}"
  fi
done
for k in $roles; do
  a=$work/old/$k.sass
  b=$work/new/$k.sass
  if [ ! -s "$a" ] || [ ! -s "$b" ]; then
    echo "$k: MISSING in $([ -s "$a" ] && echo NEW || echo OLD)"
    status=1
  elif cmp -s "$a" "$b" && cmp -s "$work/old/$k.res" "$work/new/$k.res"; then
    res=$(sed 's/ TEXTURE.*//' "$work/new/$k.res")
    echo "$k: identical ($(grep -c ';' "$a") instructions,$res)"
  else
    echo "$k: DIFFERENT"
    diff "$work/old/$k.res" "$work/new/$k.res" | head -4 || true
    diff "$a" "$b" | head -20 || true
    status=1
  fi
done
for f in "$work"/old/*.sass "$work"/new/*.sass; do
  k=$(basename "$f" .sass)
  case " $roles " in *" $k "*) ;; *)
    echo "not compared (in $(basename "$(dirname "$f")") only or not shipped): $k" ;;
  esac
done
exit $status
