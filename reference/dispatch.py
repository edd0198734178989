"""The routed-expert dispatch's window size, shared by the JAX model and the cost model.

The JAX model (reference/model.py ``routed_experts``) runs each used expert's rows through
its SwiGLU in windows of C rows; the simulator (sim/costmodel.py) costs the same windows,
padding included. One definition keeps the two in step. No JAX here: the simulator imports it.
"""

from __future__ import annotations

#: Largest window (rows per expert GEMM call).
MAX_EXPERT_WINDOW = 128


def expert_window_rows(assignments: int, experts: int) -> int:
    """C: the mean rows per expert (assignments // experts, at least 1) rounded down to a power
    of two, at most MAX_EXPERT_WINDOW. assignments = tokens x k (token, expert) pairs."""
    mean = max(1, int(assignments) // experts)
    return min(MAX_EXPERT_WINDOW, 1 << (mean.bit_length() - 1))
