"""Adapters that run other engines under the conformance kit's command contract.

Each adapter is a module runnable as
``python -m dsref.reference.oracle.adapters.NAME --checkpoint DIR --tokens T.npy --out D.safetensors [...]``;
``common.adapter_main`` gives them one argument parser, one dump writer and one
exit-code contract (0 written, 2 bad input, 3 ``unsupported: REASON``, 1 engine
error with a one-line ``error:`` summary as the last line of stderr).
Third-party engines are imported from a path the user gives (``--engine-path``),
never vendored.
"""
