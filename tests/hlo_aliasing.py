"""Reading input/output aliasing (buffer donation) out of a compiled XLA module's text."""

import re


def aliased_parameters(hlo_text: str) -> dict[int, int]:
  """`{parameter number: output index}` from the module's `input_output_alias`."""
  header = hlo_text.splitlines()[0]
  return {int(p): int(o) for o, p in re.findall(r"\{(\d+)\}: \((\d+), \{\}", header)}


def parameters_named(hlo_text: str, part: str) -> dict[int, str]:
  """`{parameter number: argument path}` of the entry parameters whose path contains `part`
  (jit names parameters after the argument's path, e.g. `caches[1].pages`)."""
  entry = hlo_text[hlo_text.index("\nENTRY"):]
  found = re.findall(r"parameter\((\d+)\), metadata=\{op_name=\"([^\"]+)\"", entry)
  return {int(n): name for n, name in found if part in name}
