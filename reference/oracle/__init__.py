"""The correctness oracle for other engines (docs/oracle.md).

    golden       dumps: the reference's logits and per-layer tensors on token ids, in safetensors
    compare      a candidate dump graded against a reference dump, tolerances by dtype
    conformance  the adversarial conformance kit: write it, run an engine on it, grade
    hf_adapter   transformers as an engine (torch/transformers imported only when used)
    cli          `dsref golden`, `dsref compare`, `dsref conformance`

Built on the model core (config, params, numpy_ref, model, checkpoint); nothing in
the core imports it. The names of golden and compare are also reachable here
(``oracle.read_dump``, ``oracle.compare_dumps``, ...), imported on first use so that
importing the package (and the CLI's parser) stays light.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "golden": ("OracleError", "canonicalize", "check_tokens", "config_hash", "golden_metadata", "jax_outputs",
               "load_tokens", "numpy_outputs", "read_dump", "read_metadata", "run_reference", "tokens_hash",
               "versions", "write_dump", "write_golden"),
    "compare": ("KINDS", "TOLERANCES", "Report", "TensorResult", "compare_dumps", "compare_files",
                "format_report", "layer_key", "normalize_dtype", "resolve_tolerances", "tensor_kind"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}


def __getattr__(name: str):
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})
