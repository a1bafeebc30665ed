"""batchkin's hook specifications: every point where a plugin can act.

There are two kinds of hooks.

**Registration hooks** are implemented at module level by a plugin module (one
listed in the ``batchkin`` entry-point group, a built-in, or a file given with
``--plugin``). Each receives a ``register`` callable, as in simonw/llm::

    @batchkin.hookimpl
    def register_methods(register):
        register("balanced_softmax", BalancedSoftmax)

**Run hooks** are implemented by a method object — an instance of a class given
to ``register_methods``, created once per run from the method's config table.
Only the methods listed in the run's ``methods`` take part in a run, and they are
called in that order (the order is printed, saved in the run folder and in each
checkpoint). Every run hook receives the one :class:`~batchkin.state.State` of
the run and may read or change it. Hooks marked *firstresult* produce one object:
the first method (in order) that returns something other than ``None`` wins, and
two enabled methods implementing the same firstresult hook are refused before
training starts, naming both. The engine's own defaults answer last.

The loop, with every hook where it fires (``hook(...)`` calls every enabled
method in order; ``=`` marks a firstresult hook)::

    # plugin loading: built-ins, entry points, --plugin files
    register_methods(register); register_models(register); register_datasets(register)

    state = State(config, ...)
    configure(state)                              # each method checks its options vs. the run
    data   = load dataset, split, subset          # train / val (held out) / test
    state.model = build model from the registry
    wrap_model(state)                             # may replace/extend state.model
    sampler = build_sampler(state)                # =  (engine: seeded uniform shuffle)
    groups  = param_groups(state)                 # extra optimizer groups (lr/wd scales)
    optimizer, schedule, scaler; resume from checkpoint (method.load_state_dict)
    on_fit_start(state)
    for epoch in epochs:                          # state.epoch counts from 1
        on_epoch_start(state)
        for step, indices in sampler:             # state.batch = on-device augmented batch
            transform_batch(state)                # may change state.batch in place
            with autocast:
                state.outputs = forward(state)    # =  (engine: features -> transform_features -> classifier)
                    transform_views(state, views) # = SSL bases: extra (mixed) views of their views
                    transform_features(state)     #    may change state.outputs["streams"]
                state.loss_terms = merge(loss_terms(state))   # named terms, summed
            backward; unscale
            before_optimizer_step(state)          # may change or drop gradients
            clip; (non-finite check); optimizer step; schedule step
            after_step(state)                     # EMA updates, momentum encoders
        on_epoch_end(state)                       # may add entries to state.epoch_metrics
        every eval_every epochs:
            for batch in val:                     # state.training = False
                state.outputs = forward(state)    # =
            on_evaluate(state, split, metrics)    # may add metrics (kNN, ...)
        checkpoint: model, optimizer, schedule, RNG, method.state_dict() per method
    on_fit_end(state)
    final evaluation on the test split (never used to select a checkpoint)

Methods also carry two plain methods used by checkpoints: ``state_dict()`` and
``load_state_dict(d)`` (see :class:`batchkin.plugin.Method`). A method class with
``raw_batch = True`` (the SSL bases, which build their own views) gets the raw
training batch: ``state.batch["x"]`` holds the uint8 images as stored, without the
engine's crop, flip and normalisation (``data.augment`` is then not used).
"""

from __future__ import annotations

import pluggy

PROJECT = "batchkin"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------- registration


@hookspec
def register_methods(register):
    """Register training methods.

    Fires once when plugins are loaded. Call ``register(name, cls)`` for each
    method; ``cls`` is a :class:`batchkin.plugin.Method` subclass whose ``Options``
    dataclass is the schema of the method's config table ``[name]``.
    """


@hookspec
def register_models(register):
    """Register model builders.

    Fires once when plugins are loaded. Call
    ``register(name, builder, options=OptionsDataclass)``; the builder is called as
    ``builder(options, num_classes=..., in_channels=..., image_size=(H, W))`` and
    returns an ``nn.Module`` following :class:`batchkin.models.Classifier`'s protocol
    (``forward_features(x) -> dict`` with ``"features"``, and ``classifier``).
    """


@hookspec
def register_datasets(register):
    """Register datasets.

    Fires once when plugins are loaded. Call
    ``register(name, loader, options=OptionsDataclass)``: the Options dataclass is
    the schema of the dataset's own keys, which sit in ``[data]`` next to the
    engine's keys (``data.name = "npz"``, ``data.path = "..."``) and are checked
    like any other table's; their names may not be engine ``[data]`` keys. The
    loader is called as ``loader(options, data=data_config)``, ``options`` the
    parsed instance and ``data_config`` the engine's ``[data]`` table. Without
    ``options`` the loader is called as ``loader(data_config)`` and ``[data]`` may
    hold no keys but the engine's. Either way it returns a
    :class:`batchkin.data.ImageDataset` (uint8 images, int64 labels, an optional
    official test split; images that stay on disk come from
    :func:`batchkin.stream.file_dataset`).
    """


# --------------------------------------------------------------------------- set-up


@hookspec
def configure(state):
    """Check the method's options against the whole run before anything is built.

    Fires once, after the config is parsed. ``state.config`` is the run's config and
    ``self.options`` the method's own table. Raise
    :class:`batchkin.errors.ConfigError` naming the key for an impossible
    combination (e.g. DRLoc with a model that has no token grid).
    """


@hookspec
def wrap_model(state):
    """Change or replace ``state.model`` after it is built from the registry.

    Fires once, before the optimizer exists, in method order (each method sees the
    previous one's result). Add modules with ``state.model.add_module`` or replace
    the model with a wrapper (BBN's two branches, MoCo's momentum encoder). The
    result must still follow the classifier protocol if the run classifies.
    """


@hookspec(firstresult=True)
def build_sampler(state):
    """Produce the training index sampler (firstresult).

    Fires once, after ``wrap_model``. Return an object with ``set_epoch(epoch)``,
    ``__len__()`` (steps per epoch), ``__iter__()`` yielding one dict per step of
    ``{stream: LongTensor of dataset indices}`` (stream ``""`` fills ``batch["x"]``
    and ``batch["y"]``; stream ``"rev"`` fills ``batch["x_rev"]``/``batch["y_rev"]``),
    and ``state_dict()``/``load_state_dict()``. The engine's default is a seeded
    uniform shuffle, sharded across processes. Its iteration must depend only on
    its state (as an exact resume needs): a streamed dataset iterates a deep copy of
    it ahead of training to load the batches, and refuses a copy that draws other
    indices.
    """


@hookspec
def param_groups(state):
    """Return extra optimizer parameter groups, or None.

    Fires once, when the optimizer is built. Return a list of dicts with
    ``params`` and optional ``lr_scale`` / ``weight_decay_scale`` (multipliers of
    the run's values) and ``name``. A parameter may be claimed by one group only;
    every unclaimed parameter goes to the default group.
    """


@hookspec
def on_fit_start(state):
    """Fires once before the first epoch (after a resume has restored the state)."""


# --------------------------------------------------------------------------- per epoch


@hookspec
def on_epoch_start(state):
    """Fires at the start of every epoch; ``state.epoch`` counts from 1.

    Schedules live here (BBN's α, DRLoc's λ, MoCo's momentum). Values a method wants
    logged go into ``state.epoch_metrics`` (a dict written to metrics.jsonl).
    """


@hookspec
def on_epoch_end(state):
    """Fires at the end of every epoch, before evaluation and the checkpoint.

    May add entries to ``state.epoch_metrics``.
    """


# --------------------------------------------------------------------------- per step


@hookspec
def transform_batch(state):
    """Change the training batch in place before the forward pass.

    Fires every training step. ``state.batch`` is a dict of on-device tensors:
    ``x`` the images, ``y`` the labels, ``idx`` the dataset indices, plus the same
    for any other sampler stream (``x_rev``, ...). ``x`` is float, already augmented
    (``data.augment``) and normalised, unless an enabled method asks for the raw
    batch (``raw_batch = True``, as the SSL bases do: they build their views from
    it): then ``x`` holds the uint8 images as stored. Per-sample changes of the
    input belong here (e.g. noise); mixing that the SSL bases' views should see
    belongs to :func:`transform_views`.
    """


@hookspec(firstresult=True)
def forward(state):
    """Run the model on ``state.batch`` and return the outputs dict (firstresult).

    Fires every training step and every evaluation batch (``state.training`` tells
    which). The engine's default calls ``state.model.forward_features(x)`` (which
    gives ``"features"`` and, for token models, ``"grid"``), sets
    ``outputs["streams"] = [features]``, fires ``transform_features`` and applies
    the classifier to every stream: ``outputs["logits"]`` is the streams' logits
    stacked. A method that owns the forward pass (BBN, MoCo) returns its own dict
    and should fire ``state.hooks.transform_features`` itself where it applies (the
    SSL bases also fire ``transform_views`` on their views).
    """


@hookspec(firstresult=True)
def transform_views(state, views):
    """Derive extra views from an SSL base's clean views (firstresult): in-batch mixing.

    Fires every training step inside the forward of an SSL base (``moco``,
    ``dino``), after it has drawn its two augmented global views and before they
    are normalised. ``views`` is uint8 ``[V, B, C, H, W]`` (``V = 2``; DINO's local
    crops are not passed): read it, do not change it. Return a
    :class:`batchkin.plugins.ssl.MixBatch` (the mixed uint8 views, each sample's
    ``lam``, its partner's row and the ``lam`` of every row), or ``None`` to add
    nothing. The base normalises the mixed views, runs them through its online
    and momentum branches next to the clean ones and stores the record in
    ``outputs["ssl"]`` (an :class:`batchkin.plugins.ssl.SSLStep`:
    ``q_mix``, ``keys_mix``, ``mix``), where the method's ``loss_terms`` reads it.
    SDMP implements it; one mixing method per run (firstresult).
    """


@hookspec
def transform_features(state, outputs):
    """Change the feature streams before the classifier.

    Fires inside the forward pass, training and evaluation. ``outputs["streams"]``
    is a list of ``[N, D]`` feature tensors; the classifier is applied to each and
    the logits are concatenated, and :meth:`State.targets` repeats the labels to
    match. BatchFormer appends its stream here in training and does nothing in
    evaluation.
    """


@hookspec
def loss_terms(state, outputs):
    """Return a dict of named loss terms (scalar tensors), or None.

    Fires every training step after the forward pass. The engine sums every term
    of every method (names must be unique across methods) and logs each one.
    Weighting is the method's business (return the weighted term).
    """


@hookspec
def before_optimizer_step(state):
    """Change or drop gradients before the optimizer step.

    Fires every training step whose loss terms are finite, after the backward pass
    and after mixed precision's loss scale has been taken out of the gradients
    (they hold their true values), before the engine's ``train.grad_clip``, the
    non-finite gradient check and the optimizer step. Scale a parameter's
    ``.grad`` in place, or set it to ``None`` to leave the parameter out of this
    step (DINO's per-parameter clip and its frozen last layer).
    """


@hookspec
def after_step(state):
    """Fires after every optimizer step (also a skipped one: ``state.step_skipped``).

    EMA and momentum-encoder updates belong here.
    """


# --------------------------------------------------------------------------- evaluation and end


@hookspec
def on_evaluate(state, split, metrics):
    """Add entries to ``metrics`` after the engine evaluated ``split`` ("val" or "test").

    Fires after each evaluation. ``state.model`` is in eval mode; self-supervised
    methods compute kNN accuracy here.
    """


@hookspec
def on_fit_end(state):
    """Fires once after the last epoch, before the final test evaluation."""
