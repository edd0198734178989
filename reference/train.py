"""Training the JAX reference with optax: DeepSeek-V3's objective and auxiliary-loss-free balancing.

The objective (DeepSeek-V3 technical report, arXiv:2412.19437):

    L = L_main + lambda * L_MTP + alpha * sum_layers L_bal

    L_main  next-token cross-entropy, mean over the B x (T-1) predicted positions
    L_MTP   the depth-1 MTP module's cross-entropy for token t+2 (sec. 2.2, eq. 24-25: the mean
            over the D depths, lambda in front; D = 1 here, as released); lambda = 0.3 for the
            first 10T tokens, then 0.1 (sec. 4.2)
    L_bal   the sequence-wise balance loss (sec. 2.1.2, eq. 17-20), per sequence and MoE layer:
            s'_{i,t} = s_{i,t} / sum_j s_{j,t} (sigmoid affinities normalised per token),
            f_i = E / (k T) * #{t : i in TopK_t},  P_i = mean_t s'_{i,t},  L_bal = sum_i f_i P_i;
            averaged over the batch; alpha = 1e-4 in V3 ("extremely small"), 0 = off

Auxiliary-loss-free balancing (sec. 2.1.2; Wang et al. 2024, arXiv:2408.15664): after each step,
each MoE layer's ``e_score_correction_bias`` moves by gamma * sign(mean load - load_i), where
load_i counts the tokens of the step's batch routed to expert i. The bias is outside the
gradient (the optimizer never touches it: ``optax.set_to_zero`` on its leaves) and only selects
experts, never weights them (``reference.model.route``). gamma = 0.001 for the first 14.3T
tokens, then 0 (sec. 4.2). MaxVio = max_i load_i / mean load - 1, per MoE layer (Wang et al.).

The optimizer is AdamW (beta1 0.9, beta2 0.95, weight decay 0.1, gradient clipping at norm 1.0:
V3 sec. 4.2) with linear warmup then cosine decay to ``min_lr_ratio`` of the peak.

Precision: the parameters (and AdamW's moments) are float32, the master copy. ``compute=
"bfloat16"`` runs the forward and backward on a bf16 copy: every weight rounded to bf16 (except
the balancing bias, which only selects) and bf16 activations between the matmuls, which
accumulate in float32 (reference.model.einsum); the gradient of the rounding is the identity,
so it lands on the float32 master weights. MLA runs in its naive form (per-head keys and
values), as a training step does. ``fp8=True`` runs the Linear GEMMs (Fprop, Dgrad and Wgrad)
through DeepSeek-V3's FP8 recipe, simulated (sec. 3.3: e4m3 inputs, 1x128 activation tiles,
128x128 weight blocks, float32 accumulation; reference/fp8_train.py); the embedding, LM head,
router, norms and attention operators stay in ``compute``'s precision, as in V3.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dsref.reference.fp8_train import Fp8Recipe
from dsref.reference.model import DeepseekModel, forward, mtp_logits

F32 = jnp.float32
BIAS = "mlp__gate__e_score_correction_bias"  # the balancing bias's attribute in a LayerStack
COMPUTE = {"float32": F32, "bfloat16": jnp.bfloat16}


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters (defaults: DeepSeek-V3 sec. 4.2 where it gives them)."""

    steps: int = 100
    lr: float = 3e-4
    warmup: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float = 1.0
    mtp_weight: float = 0.3      # lambda
    balance_alpha: float = 0.0   # alpha of the sequence-wise balance loss (V3: 1e-4)
    bias_gamma: float = 0.001    # the bias update speed (0 = no auxiliary-loss-free balancing)
    compute: str = "float32"     # the forward/backward's precision: "float32" or "bfloat16"
    fp8: bool = False            # V3's FP8 GEMM recipe, simulated (reference/fp8_train.py)

    def __post_init__(self):
        for name in ("steps", "warmup"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (1 if name == "steps" else 0):
                raise ValueError(f"{name} must be an integer >= {1 if name == 'steps' else 0}, got {v!r}")
        for name in ("lr", "min_lr_ratio", "weight_decay", "clip_norm", "mtp_weight", "balance_alpha",
                     "bias_gamma"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not isinstance(self.fp8, bool):
            raise ValueError(f"fp8 must be True or False, got {self.fp8!r}")
        if self.compute not in COMPUTE:
            raise ValueError(f"compute must be one of {', '.join(COMPUTE)}, got {self.compute!r}")
        if not 0 <= self.b1 < 1 or not 0 <= self.b2 < 1:
            raise ValueError(f"b1 and b2 must be in [0, 1), got {self.b1!r}, {self.b2!r}")


class StepMetrics(NamedTuple):
    """One step's numbers (device arrays): the total loss and its parts, the gradient norm before
    clipping, the learning rate used, and per MoE layer the expert loads [n_moe, E] and MaxVio."""

    loss: jax.Array
    main: jax.Array
    mtp: jax.Array
    balance: jax.Array
    grad_norm: jax.Array
    lr: jax.Array
    loads: jax.Array
    max_violation: jax.Array


def schedule(tc: TrainConfig):
    """Linear warmup from 0 to lr over ``warmup`` steps, then cosine to lr * min_lr_ratio at ``steps``."""
    decay = max(tc.steps - tc.warmup, 1)
    return optax.warmup_cosine_decay_schedule(0.0, tc.lr, tc.warmup, tc.warmup + decay, tc.lr * tc.min_lr_ratio)


def _names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]


def _is_bias(path) -> bool:
    return BIAS in _names(path)


def optimizer(tc: TrainConfig, params) -> optax.GradientTransformation:
    """AdamW with the schedule and clipping; the balancing biases are frozen (moved by
    ``update_biases`` instead); norms and biases get no weight decay."""
    labels = jax.tree_util.tree_map_with_path(lambda p, _: "bias" if _is_bias(p) else "train", params)
    decay = jax.tree_util.tree_map_with_path(
        lambda p, _: not any(n.endswith("norm__weight") or n.endswith("__bias") for n in _names(p)), params)
    adamw = optax.chain(optax.clip_by_global_norm(tc.clip_norm),
                        optax.adamw(schedule(tc), b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay, mask=decay))
    return optax.multi_transform({"train": adamw, "bias": optax.set_to_zero()}, labels)


def cross_entropy(logits, targets):
    """Mean -log p(target) over every position; logits [..., V] float32, targets [...] int."""
    logp = jax.nn.log_softmax(logits.astype(F32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def balance_loss(router_logits, topk_ids, num_experts: int, scoring_func: str):
    """Sequence-wise balance loss of one layer (V3 eq. 17-20), averaged over the batch.
    router_logits [B, T, E], topk_ids [B, T, k]."""
    k, T = topk_ids.shape[-1], topk_ids.shape[-2]
    s = jax.nn.sigmoid(router_logits) if scoring_func == "sigmoid" else jax.nn.softmax(router_logits, -1)
    s = s / jnp.sum(s, -1, keepdims=True)
    f = num_experts / (k * T) * jax.nn.one_hot(topk_ids, num_experts, dtype=F32).sum((-3, -2))  # [B, E]
    p = jnp.mean(s, axis=-2)  # [B, E]
    return jnp.mean(jnp.sum(jax.lax.stop_gradient(f) * p, -1))


def moe_layers(model: DeepseekModel, tc: TrainConfig | None = None) -> list[int]:
    """The MoE layers a training step routes through, in the order of its ``loads`` rows: the
    main model's, then the MTP module's (when the model has one and ``tc`` trains it)."""
    cfg = model.cfg
    main = [i for st in model.stacks for i in st.layers if cfg.is_moe_layer(i)]
    mtp = [i for st in model.mtp for i in st.layers if cfg.is_moe_layer(i)] if _trains_mtp(model, tc) else []
    return main + mtp[:1]  # depth 0 only: the one MTP module DeepSeek released (and trained here)


def _trains_mtp(model: DeepseekModel, tc: TrainConfig | None) -> bool:
    return len(model.mtp) > 0 and (tc is None or tc.mtp_weight > 0)


def compute_params(params, tc: TrainConfig):
    """The parameters as the forward takes them: bf16-rounded copies for compute="bfloat16"
    (the balancing bias stays float32: it only selects experts)."""
    if tc.compute == "float32":
        return params
    dt = COMPUTE[tc.compute]
    return jax.tree_util.tree_map_with_path(
        lambda p, a: a if _is_bias(p) else a.astype(dt).astype(a.dtype), params)


def loss_fn(params, graphdef, tokens, tc: TrainConfig):
    """(loss, (parts, loads [n_moe, E])) for token windows [B, T+1]: inputs tokens[:, :-1],
    targets tokens[:, 1:]; the MTP module (when the model has it) predicts tokens[:, 2:].
    ``loads`` rows follow ``moe_layers(model, tc)``."""
    model = nnx.merge(graphdef, compute_params(params, tc))
    model.dtype = COMPUTE[tc.compute]  # activations (the merged copy only; the graphdef keeps float32)
    cfg = model.cfg
    cap: dict[str, Any] = {}
    prec = Fp8Recipe() if tc.fp8 else None
    out = forward(model, tokens[:, :-1], capture=cap, mla_form="naive", prec=prec)
    main = cross_entropy(out.logits, tokens[:, 1:])
    mtp = jnp.zeros((), F32)
    mcap: dict[str, Any] = {}
    if _trains_mtp(model, tc):
        # position t: main hidden h_t (after the final norm) + embedding of token t+1 -> token t+2
        mtp = cross_entropy(mtp_logits(model, tokens[:, 1:-1], out.hidden[:, :-1], capture=mcap, prec=prec).logits,
                            tokens[:, 2:])
    L = cfg.num_hidden_layers
    routing = [(cap[f"layers.{i}.router_logits"], cap[f"layers.{i}.topk_ids"]) if i < L
               else (mcap["router_logits"], mcap["topk_ids"]) for i in moe_layers(model, tc)]
    bal = jnp.zeros((), F32)
    if tc.balance_alpha > 0:
        bal = sum(balance_loss(lg, ids, cfg.n_routed_experts, cfg.scoring_func) for lg, ids in routing)
    loads = jnp.stack([jax.nn.one_hot(ids, cfg.n_routed_experts, dtype=F32).sum((0, 1, 2)) for _, ids in routing]
                      ) if routing else jnp.zeros((0, cfg.n_routed_experts), F32)
    loss = main + tc.mtp_weight * mtp + tc.balance_alpha * bal
    return loss, ((main, mtp, bal), loads)


def max_violation(loads):
    """MaxVio per layer: max_i load_i / mean_i load_i - 1 (0 = perfectly balanced)."""
    return loads.max(-1) / jnp.maximum(loads.mean(-1), 1e-9) - 1


def update_biases(params, loads, gamma: float, layer_map):
    """b_i += gamma * sign(mean load - load_i) for each MoE layer, outside the gradient.
    layer_map: for each row of ``loads`` [n_moe, E], where its bias lives: (group, stack index,
    layer within the stack), group "stacks" (main model) or "mtp" (``layer_rows``); a plain
    (stack, layer) pair means group "stacks"."""
    if gamma == 0 or loads.shape[0] == 0:
        return params
    delta = gamma * jnp.sign(loads.mean(-1, keepdims=True) - loads)
    rows: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for row, where in enumerate(layer_map):
        group, s, j = where if len(where) == 3 else ("stacks", *where)
        rows.setdefault((group, s), []).append((j, row))

    def move(path, a):
        names = _names(path)
        if BIAS not in names:
            return a
        for j, row in rows.get((names[0], int(names[1])), []):
            a = a.at[j].add(delta[row].astype(a.dtype))
        return a
    return jax.tree_util.tree_map_with_path(move, params)


def layer_rows(model: DeepseekModel, tc: TrainConfig) -> tuple[tuple[str, int, int], ...]:
    """(group, stack index, layer within the stack) of each ``moe_layers(model, tc)`` row."""
    where = {i: (group, s, i - st.first) for group in ("stacks", "mtp")
             for s, st in enumerate(getattr(model, group)) for i in st.layers}
    return tuple(where[i] for i in moe_layers(model, tc))


@partial(jax.jit, static_argnums=(0, 4, 5, 6), donate_argnums=(1, 2))
def _train_step(graphdef, params, opt_state, tokens, tx, tc: TrainConfig, layer_map: tuple, step):
    (loss, ((main, mtp, bal), loads)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, graphdef, tokens, tc)
    gnorm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    params = update_biases(params, loads, tc.bias_gamma, layer_map)
    return params, opt_state, StepMetrics(loss, main, mtp, bal, gnorm, schedule(tc)(step), loads,
                                          max_violation(loads))


class Trainer:
    """A model, its optimizer state and the step count; ``step(tokens)`` trains on one batch of
    token windows [B, T+1] and returns its StepMetrics. Deterministic given the inputs.

    mesh (reference/mesh.py): the weights are placed by their tensor-table specs (experts over
    ``expert``, Megatron splits over ``tensor``), AdamW's moments follow them, and each batch is
    split over data x expert (which must divide it); the MoE layers then run expert-parallel
    (two all-to-alls each), and XLA inserts the gradient reductions. Same objective, other
    summation orders: losses agree with one device to float32 rounding, not bit for bit."""

    def __init__(self, model: DeepseekModel, tc: TrainConfig, mesh=None):
        if model.dtype != F32:
            raise ValueError("training keeps float32 weights (the master copy); load or build the model in float32")
        self.tc, self.mesh = tc, mesh
        if mesh is not None:
            from dsref.reference.mesh import shard_model
            shard_model(model, mesh)
        self.graphdef, self.params = nnx.split(model)
        self.tx = optimizer(tc, self.params)  # a NamedTuple of functions: hashable, a static jit argument
        # jit: the moments are created with their parameters' placements
        self.opt_state = jax.jit(self.tx.init)(self.params)
        self.layers = tuple(moe_layers(model, tc))  # the layer index of each row of StepMetrics.loads
        self.layer_map = layer_rows(model, tc)
        self.steps_done = 0

    def step(self, tokens) -> StepMetrics:
        tokens = jnp.asarray(tokens, jnp.int32)
        if self.mesh is None:
            self.params, self.opt_state, m = _train_step(self.graphdef, self.params, self.opt_state, tokens,
                                                         self.tx, self.tc, self.layer_map, jnp.int32(self.steps_done))
        else:
            from dsref.reference.mesh import mesh_shape, place_batch
            split = mesh_shape(self.mesh).batch_split
            if tokens.shape[0] % split:
                raise ValueError(f"--batch {tokens.shape[0]}: must be a multiple of the mesh's data x expert = {split}")
            with jax.set_mesh(self.mesh):
                self.params, self.opt_state, m = _train_step(
                    self.graphdef, self.params, self.opt_state, place_batch(tokens, self.mesh), self.tx, self.tc,
                    self.layer_map, jnp.int32(self.steps_done))
        self.steps_done += 1
        return m

    def load_opt_state(self, state) -> None:
        """Replace the optimizer state (e.g. read from a checkpoint: host arrays of the same tree),
        each leaf placed like the one it replaces."""
        self.opt_state = jax.tree.map(lambda old, new: jax.device_put(jnp.asarray(new, old.dtype), old.sharding),
                                      self.opt_state, state)

    def model(self) -> DeepseekModel:
        return nnx.merge(self.graphdef, self.params)


def windows(ids: np.ndarray, batch: int, seq: int, rng: np.random.Generator) -> np.ndarray:
    """A batch of ``batch`` random windows of seq+1 consecutive token ids from a 1-D corpus."""
    if ids.ndim != 1 or ids.size < seq + 2:
        raise ValueError(f"the corpus has {ids.size} tokens; windows of {seq + 1} need at least {seq + 2}")
    starts = rng.integers(0, ids.size - seq - 1, batch)
    return np.stack([ids[s:s + seq + 1] for s in starts]).astype(np.int32)
