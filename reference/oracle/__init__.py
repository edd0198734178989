"""The correctness oracle for other engines: golden dumps, compare, the conformance kit (docs/oracle.md).

Nothing in the model core (config, params, numpy_ref, model, checkpoint, decode,
presets) imports this package; it is built on top of them.
"""

from dsref.reference.oracle.golden import (  # noqa: F401
    KINDS, TOLERANCES, OracleError, Report, TensorResult, canonicalize, check_tokens, compare_dumps,
    compare_files, config_hash, format_report, golden_metadata, jax_outputs, layer_key, load_tokens,
    normalize_dtype, numpy_outputs, read_dump, read_metadata, resolve_tolerances, run_reference, tensor_kind,
    tokens_hash, versions, write_dump, write_golden)
