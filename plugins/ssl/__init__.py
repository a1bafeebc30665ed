"""Shared pieces of the self-supervised methods ``moco``, ``dino`` and ``sdmp``.

METHODS.md section 4 is the specification. This package holds what the two SSL bases
(:mod:`batchkin.plugins.moco`, :mod:`batchkin.plugins.dino`) and the mixing method
(:mod:`batchkin.plugins.sdmp`) share; it registers no method itself.

* :mod:`.views` — the on-device view pipeline (:func:`make_views`,
  :func:`make_local_views`, :func:`normalize_views`; options :class:`ViewOptions`,
  :class:`LocalCrops`);
* :mod:`.net` — the SSL network (:class:`SSLNet`), the heads (:func:`mlp`,
  :class:`DINOHead`), the momentum update (:func:`cosine_momentum`, :func:`ema_update_`);
* :mod:`.knn` — kNN evaluation (:func:`knn_scores`, :class:`KNNEvaluator`);
* :mod:`.base` — the bases' common part (:class:`SSLOptions`, :class:`SSLBase`,
  :func:`ssl_train_forward`) and the record a mixing method returns through the
  ``transform_views`` hook (:class:`MixBatch`) and reads back in ``outputs["ssl"]``
  (:class:`SSLStep`).

The linear probe is the engine's (:mod:`batchkin.probe`, ``batchkin probe``); its names
stay importable from here.
"""

from batchkin.probe import encode, linear_probe, probe_state, train_linear

from .base import (
    MixBatch,
    SSLBase,
    SSLOptions,
    SSLStep,
    check_last_batch,
    check_ssl_run,
    ssl_train_forward,
)
from .knn import KNNEvaluator, knn_scores
from .net import (
    DINOHead,
    SSLNet,
    cosine_momentum,
    ema_update_,
    encoder_input_error,
    fp32,
    gather_rows,
    mlp,
)
from .views import (
    LocalCrops,
    ViewOptions,
    blur_kernel_size,
    colour_jitter,
    gaussian_blur,
    hsv_to_rgb,
    make_local_views,
    make_views,
    normalize_views,
    random_resized_crop_boxes,
    resized_crop,
    rgb_to_hsv,
    solarize,
    to_uint8,
)

__all__ = [
    "DINOHead", "KNNEvaluator", "LocalCrops", "MixBatch", "SSLBase", "SSLNet", "SSLOptions", "SSLStep",
    "ViewOptions", "blur_kernel_size", "check_last_batch", "check_ssl_run", "colour_jitter", "cosine_momentum",
    "ema_update_", "encode", "encoder_input_error", "fp32", "gather_rows", "gaussian_blur", "hsv_to_rgb",
    "knn_scores", "linear_probe", "make_local_views", "make_views", "mlp", "normalize_views", "probe_state",
    "random_resized_crop_boxes", "resized_crop", "rgb_to_hsv", "solarize", "ssl_train_forward", "to_uint8",
    "train_linear",
]
