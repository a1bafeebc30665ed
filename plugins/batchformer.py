"""``batchformer``: BatchFormer — a transformer encoder across the batch dimension, with a shared classifier.

METHODS.md section 2 is the specification. The ``B`` samples of a mini-batch form one
sequence of ``B`` tokens, so each sample's feature attends to the others.

* **Module.** :class:`batchkin.nn.BatchFormer` (``[batchformer]
  layers`` post-norm encoder layers over the batch, built on the batch-attention op),
  equivalent to ``nn.TransformerEncoderLayer(d_model=C, nhead=heads,
  dim_feedforward=ffn_dim, dropout=dropout)`` fed ``f.unsqueeze(1)``: no positional
  encoding, no mask (permutation-equivariant over the batch); dropout on the attention
  probabilities, inside the FFN and on both residuals. ``wrap_model`` adds it to the
  model as the child ``batchformer`` (so it is checkpointed, moved to the device and part
  of the model under DistributedDataParallel), with ``C = model.feature_dim`` — for BBN's
  bilateral wrapper that is the combined width ``2D``.
* **Training** (``transform_features``): the feature stream ``f = outputs["streams"][0]``
  gets a BatchFormer stream appended, ``streams = [f, BF(f)]``; the engine applies the
  model's ONE classifier to each stream and concatenates the logits, and
  ``state.targets()`` repeats the labels. So with ``ce`` the loss is the mean
  cross-entropy over ``2B`` rows, ``(CE(plain) + CE(bf)) / 2``, and gradients reach the
  backbone through both streams. The stacked features ``[f; BF(f)]`` are never
  materialised (only the ``[2B, K]`` logits are concatenated). Ablation
  ``shared_classifier = false``: the BF stream replaces ``f`` (``streams = [BF(f)]``) —
  kept only as an ablation, METHODS.md reports that it collapses.
* **Evaluation**: identity. Nothing is added, the logits are ``classifier(f)`` and do
  not depend on the other samples of the batch (single-sample inference works).
* **Dropout randomness**: one seed per application, drawn from the run's CPU generator
  ``state.generator("batchformer", "cpu")`` (saved in checkpoints, so ``--resume`` is
  exact); layer ``i`` uses ``derive_key(seed, i)`` (see ``BatchFormer.forward``). With
  several processes and the local batch, the rank is folded into the seed (each rank's
  masks differ); with ``global_batch`` every rank uses the same seed, so every rank
  computes the same global BatchFormer output.
* **Optimizer**: the module's parameters form their own group ``"batchformer"`` with
  ``lr = optim.lr * lr_scale`` and ``weight_decay = optim.weight_decay *
  weight_decay_scale`` (upstream uses 0.1x lr on ResNet-50 features).
* **Distributed** (``global_batch = true``): the features of every rank are all-gathered
  with a differentiable all-gather (:func:`all_gather_with_grad`: the backward
  reduce-scatters the gradient of the gathered tensor: each rank receives the summed
  gradient of its own rows), the module runs over the global batch and each rank keeps
  its own rows. The gradients then equal those of one process holding the whole batch.
  The default attends over the local batch, as upstream.

**Composition.**

* ``ce`` (and any loss reading ``outputs["logits"]`` with ``state.targets()``, such as
  balanced softmax): list it with ``batchformer`` in any order.
* ``bbn``: BatchFormer acts on BBN's **combined** features, the classifier's input
  ``cat(2 alpha f_c, 2 (1 - alpha) f_r)`` (BBN fires ``transform_features`` on them
  through ``batchkin.trainer.classify_streams``): each token is one (uniform sample,
  reversed sample) pair, and the one ``Linear(2D, K)`` classifier is the shared
  classifier. BBN's loss ``alpha CE(z, y_c) + (1 - alpha) CE(z, y_r)`` then averages over
  both streams (its targets are repeated too). Evaluation is BBN's ``alpha = 0.5``
  combiner without BatchFormer. ``bbn`` must be listed before ``batchformer`` (so that
  the module is built for the bilateral model's ``2D`` width); the reverse order is
  refused naming ``methods``.
* SSL bases (``moco``, ``dino``, with or without ``sdmp``): their model fires
  ``transform_features`` for every view inside its forward; the BF stream is appended
  there, the projector (the head) runs on every stream, so the module sits at the start
  of the projector, and the keys stay the momentum branch's (which has no BatchFormer:
  list ``batchformer`` after the base so the momentum copy does not carry it).

Functional twins, usable without the engine: :func:`batchformer_logits`,
:func:`batchformer_features`, :func:`all_gather_with_grad`, :func:`resolve_heads`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from batchkin.errors import ConfigError, RunError
from batchkin.hookspecs import hookimpl
from batchkin.nn import BatchFormer, draw_seed
from batchkin.kernels.rng import derive_key
from batchkin.plugin import Method

#: The model's child name of the module.
CHILD = "batchformer"
#: Upstream's rule for ``heads = 0``: one head up to this feature width, else 4.
ONE_HEAD_MAX_WIDTH = 128


# ------------------------------------------------------------------------------ functional twins


def resolve_heads(heads: int, width: int) -> int:
    """The number of attention heads: ``heads``, or upstream's rule when ``heads == 0``
    (1 head when ``width <= 128``, else 4)."""
    if heads == 0:
        return 1 if width <= ONE_HEAD_MAX_WIDTH else 4
    return heads


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather of ``[n_r, C]`` row blocks (``sizes[r]`` rows from rank ``r``) with a gradient.

    Backward: the gradient of the gathered ``[N, C]`` tensor is summed over ranks (every
    rank's loss may depend on every row) and this rank's rows are returned: one
    reduce-scatter, so each rank receives only its own block's sum (an all-reduce would
    move every block to every rank).
    """

    @staticmethod
    def forward(ctx, x, group, sizes, rank):
        import torch.distributed as dist

        m = max(sizes)
        x = x.contiguous()
        padded = x if x.shape[0] == m else torch.cat([x, x.new_zeros(m - x.shape[0], *x.shape[1:])])
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=group)
        ctx.group, ctx.sizes, ctx.n = group, sizes, x.shape[0]
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        m = max(ctx.sizes)
        if all(s == m for s in ctx.sizes):
            blocks = grad.contiguous()
        else:  # every rank's block padded to m rows, as reduce-scatter needs equal blocks
            blocks = torch.cat([torch.cat([b, b.new_zeros(m - b.shape[0], *b.shape[1:])])
                                for b in grad.split(list(ctx.sizes))])
        mine = grad.new_empty(m, *grad.shape[1:])
        dist.reduce_scatter_tensor(mine, blocks, op=dist.ReduceOp.SUM, group=ctx.group)
        return mine[: ctx.n], None, None, None


def all_gather_with_grad(x: torch.Tensor, group=None) -> tuple[torch.Tensor, int]:
    """Gather ``x`` (``[n, C]``; ``n`` may differ per rank) from every rank of ``group``, in
    rank order, differentiably.

    Returns ``(gathered [N, C], start)``: ``gathered[start:start + n]`` are this rank's rows.
    The backward sums the gathered tensor's gradient over ranks and returns this rank's
    rows (one reduce-scatter), so the gradient w.r.t. ``x`` is that of the sum of every
    rank's loss. Costs two collectives in the forward (the row counts, then the rows).
    Without an initialised process group, or with one process, returns ``(x, 0)``.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return x, 0
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    counts = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(counts, n, group=group)
    sizes = tuple(torch.cat(counts).tolist())  # one host sync
    return _AllGatherWithGrad.apply(x, group, sizes, rank), sum(sizes[:rank])


def batchformer_features(
    features: torch.Tensor,
    module: nn.Module,
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    global_batch: bool = False,
    group=None,
) -> torch.Tensor:
    """``BF(f)``: ``module`` over the batch ``features`` (``[B, C]``).

    With ``global_batch`` (and an initialised process group of several ranks) the
    features of every rank are gathered with :func:`all_gather_with_grad`, the module
    runs over the global batch and this rank's rows are returned; every rank must then
    pass the same ``seed`` (or identically seeded generators) so that all compute the
    same global output. Dropout follows ``module.training``: its randomness comes from
    ``seed`` or, when None, ``generator``.
    """
    if global_batch:
        full, start = all_gather_with_grad(features, group)
        if full is not features:
            return module(full, generator, seed=seed)[start : start + features.shape[0]]
    return module(features, generator, seed=seed)


def batchformer_logits(
    features: torch.Tensor,
    labels: torch.Tensor,
    module: nn.Module,
    classifier: nn.Module,
    training: bool,
    *,
    shared_classifier: bool = True,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    global_batch: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchFormer's logits and the labels they are scored against.

    * training, shared classifier: ``(cat(classifier(f), classifier(BF(f))), cat(y, y))``
      — the mean cross-entropy of these is ``(CE(plain) + CE(bf)) / 2``; the stacked
      features are not materialised, only the logits are concatenated;
    * training, ``shared_classifier=False`` (ablation): ``(classifier(BF(f)), y)``;
    * evaluation (``training=False``): ``(classifier(f), y)`` — BatchFormer is the
      identity, each sample's logits are independent of the rest of the batch.

    ``features``: ``[B, C]``; ``labels``: ``[B]``. Dropout inside the module follows
    ``module.training`` and draws from ``seed`` / ``generator`` (see
    :func:`batchformer_features`).
    """
    if features.dim() != 2:
        raise ValueError(f"features must be [B, C]; got shape {tuple(features.shape)}")
    if labels.shape[0] != features.shape[0]:
        raise ValueError(f"labels ({labels.shape[0]}) and features ({features.shape[0]}) differ in batch size")
    if not training:
        return classifier(features), labels
    bf = batchformer_features(features, module, generator=generator, seed=seed, global_batch=global_batch)
    if not shared_classifier:
        return classifier(bf), labels
    return torch.cat([classifier(features), classifier(bf)]), labels.repeat(2)


# ------------------------------------------------------------------------------ the method


class BatchFormerMethod(Method):
    """BatchFormer as a batchkin method: a thin adapter over the functions above."""

    @dataclass
    class Options:
        layers: int = field(default=1, metadata={"ge": 1, "help": "encoder layers"})
        heads: int = field(
            default=4,
            metadata={"ge": 0, "help": "attention heads (must divide the feature width); 0 = upstream's rule: "
                                       "1 head when the width <= 128, else 4"},
        )
        ffn_dim: int = field(default=0, metadata={"ge": 0, "help": "feed-forward width (0 = the feature width C)"})
        dropout: float = field(
            default=0.5, metadata={"ge": 0.0, "lt": 1.0,
                                   "help": "dropout on attention probabilities, inside the FFN and on both residuals"}
        )
        shared_classifier: bool = field(
            default=True,
            metadata={"help": "train the classifier on [f; BF(f)] (false: on BF(f) only — an ablation)"},
        )
        lr_scale: float = field(default=1.0, metadata={"ge": 0.0, "help": "the module's lr = optim.lr * lr_scale"})
        weight_decay_scale: float = field(
            default=1.0, metadata={"ge": 0.0, "help": "the module's weight decay = optim.weight_decay * this"}
        )
        global_batch: bool = field(
            default=False,
            metadata={"help": "with several processes: attend over the global batch (differentiable all-gather)"},
        )

    def __init__(self, options=None):
        super().__init__(options)
        self.module: BatchFormer | None = None

    # -- set-up ---------------------------------------------------------------------------

    @hookimpl
    def configure(self, state):
        methods = list(state.config.methods)
        if "bbn" in methods and methods.index("bbn") > methods.index("batchformer"):
            raise ConfigError(
                f"methods = {methods}: list 'bbn' before 'batchformer' (BatchFormer acts on BBN's combined "
                "features, whose width 2D is known once bbn has wrapped the model)"
            )

    @hookimpl
    def wrap_model(self, state):
        model = state.model
        width = getattr(model, "feature_dim", None)
        if not isinstance(width, int) or isinstance(width, bool) or width < 1:
            raise ConfigError(
                f"batchformer needs a model with an integer feature_dim (the classifier protocol); "
                f"model.name = {state.config.model['name']!r} has feature_dim = {width!r}"
            )
        if hasattr(model, CHILD):
            raise ConfigError(f"the model already has a child named {CHILD!r}; batchformer is added once")
        o = self.options
        heads = resolve_heads(o.heads, width)
        if width % heads:
            raise ConfigError(
                f"batchformer.heads = {o.heads} must divide the feature width {width} of model "
                f"{state.config.model['name']!r} (each head gets width / heads channels)"
            )
        self.module = BatchFormer(width, num_layers=o.layers, nhead=heads, dim_feedforward=o.ffn_dim or width,
                                  dropout=o.dropout)
        model.add_module(CHILD, self.module)

    @hookimpl
    def param_groups(self, state):
        module = self._module()
        in_model = {id(p) for p in state.unwrapped_model.parameters()}
        if any(id(p) not in in_model for p in module.parameters()):
            raise ConfigError(
                f"methods = {list(state.config.methods)}: a method listed after 'batchformer' replaced the model "
                "without keeping its 'batchformer' child (list batchformer after it)"
            )
        return [{
            "params": list(module.parameters()),
            "lr_scale": self.options.lr_scale,
            "weight_decay_scale": self.options.weight_decay_scale,
            "name": "batchformer",
        }]

    @hookimpl
    def on_fit_start(self, state):
        width = getattr(state.unwrapped_model, "feature_dim", None)
        d = self._module().layers[0].d_model
        if width is not None and width != d:
            raise ConfigError(
                f"methods = {list(state.config.methods)}: batchformer was built for features of width {d} but "
                f"the final model's feature_dim is {width}; list the method that changes the features before "
                "batchformer"
            )

    # -- per step -------------------------------------------------------------------------

    def step_seed(self, state) -> int:
        """The dropout seed of one application (0 without dropout: nothing is drawn)."""
        if self.options.dropout <= 0.0:
            return 0
        seed = draw_seed(state.generator("batchformer", "cpu"))
        if state.world_size > 1 and not self.options.global_batch:
            seed = derive_key(seed, state.rank)  # each rank's local batch gets its own masks
        return seed

    @hookimpl
    def transform_features(self, state, outputs):
        if not state.training:
            return  # evaluation: identity
        streams = outputs["streams"]
        f = streams[0]
        module = self._module()
        d = module.layers[0].d_model
        if f.dim() != 2 or f.shape[1] != d:
            raise RunError(f"batchformer: expected features [B, {d}], got {tuple(f.shape)}")
        bf = batchformer_features(f, module, seed=self.step_seed(state), global_batch=self.options.global_batch)
        if self.options.shared_classifier:
            streams.append(bf)
        else:
            streams[0] = bf

    def _module(self) -> BatchFormer:
        if self.module is None:
            raise RunError("batchformer: the module does not exist yet (wrap_model has not run)")
        return self.module


@hookimpl
def register_methods(register):
    register("batchformer", BatchFormerMethod)
