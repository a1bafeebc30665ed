"""Every method of batchkin as plain functions, and the ops they run on.

Each training method is a thin plugin over functions that take tensors and return
tensors (no run state, no hooks); they are collected here so that they can be used in
any training loop::

    from batchkin import functional as bf

    alpha = bf.bbn_alpha(epoch, epochs)                       # BBN's cumulative-learning weight
    loss = bf.bbn_loss(bf.bbn_logits(f_c, f_r, alpha, w), y, y_rev, alpha)
    mixed, lam, params = bf.sdmp_mix(views, generator)        # SDMP's in-batch mixing (uint8 views)
    terms = bf.sdmp_moco_terms(q_mix, keys, keys_mix, lam, 0.2)

==========================  ===========================================================
method                      functions (ops from ``batchkin.kernels`` marked *op*)
==========================  ===========================================================
BBN                         :func:`bbn_alpha`, :func:`sample_beta`, :func:`bbn_features`,
                            :func:`bbn_logits` (the combiner), :func:`bbn_loss`,
                            :func:`reversed_sampler`; *op* :func:`sample_epoch`,
                            :func:`class_sorted_table`, :func:`class_probabilities`
BatchFormer                 :func:`batchformer_features`, :func:`batchformer_logits`;
                            *op* :func:`batch_attention`
DRLoc                       :func:`drloc_lambda`, :func:`drloc_loss`, :func:`drloc_l1_loss`,
                            :func:`drloc_ce_loss`, :func:`drloc_cbr_loss`; *op*
                            :func:`drloc_positions` (the sample), :func:`drloc_targets`,
                            :func:`drloc_pairs`, :func:`drloc_gather`, :func:`drloc_first_layer`
SDMP                        :func:`sdmp_mix`, :func:`sdmp_lam_eff`, :func:`mixture_nll`,
                            :func:`sdmp_ms_loss`, :func:`sdmp_mm_weights`, :func:`sdmp_mm_loss`,
                            :func:`sdmp_moco_terms`, :func:`sdmp_moco_loss`,
                            :func:`sdmp_dino_loss`, :func:`soft_cross_entropy`; *op*
                            :func:`batch_mix`, :func:`sample_mix_params`, :func:`partner_index`
MoCo v3                     :func:`moco_infonce`, :func:`moco_loss`
DINO                        :func:`dino_loss`, :func:`teacher_probs`, :func:`teacher_temperature`,
                            :func:`update_center`, :func:`teacher_entropy`,
                            :func:`clip_gradients_`, :func:`local_crop_size`
SSL (MoCo, DINO, SDMP)      :func:`make_views`, :func:`make_local_views`, :func:`normalize_views`,
                            :func:`cosine_momentum`, :func:`ema_update_`, :func:`knn_scores`,
                            :func:`train_linear` (the linear probe's classifier)
==========================  ===========================================================
"""

from batchkin.kernels.batch_attention import batch_attention
from batchkin.kernels.batch_mix import batch_mix, partner_index, sample_mix_params
from batchkin.kernels.drloc_pairs import drloc_first_layer, drloc_gather, drloc_pairs, drloc_positions, drloc_targets
from batchkin.kernels.reversed_sampler import class_probabilities, class_sorted_table, sample_epoch
from batchkin.plugins.batchformer import batchformer_features, batchformer_logits
from batchkin.plugins.bbn import bbn_alpha, bbn_features, bbn_logits, bbn_loss, reversed_sampler, sample_beta
from batchkin.plugins.dino import (
    clip_gradients_,
    dino_loss,
    local_crop_size,
    teacher_entropy,
    teacher_probs,
    teacher_temperature,
    update_center,
)
from batchkin.plugins.drloc import drloc_cbr_loss, drloc_ce_loss, drloc_l1_loss, drloc_lambda, drloc_loss
from batchkin.plugins.moco import moco_infonce, moco_loss
from batchkin.plugins.sdmp import (
    mixture_nll,
    sdmp_dino_loss,
    sdmp_lam_eff,
    sdmp_mix,
    sdmp_mm_loss,
    sdmp_mm_weights,
    sdmp_moco_loss,
    sdmp_moco_terms,
    sdmp_ms_loss,
    soft_cross_entropy,
)
from batchkin.plugins.ssl import cosine_momentum, ema_update_, knn_scores, make_local_views, make_views, normalize_views
from batchkin.probe import train_linear

__all__ = [
    # BBN
    "bbn_alpha", "sample_beta", "bbn_features", "bbn_logits", "bbn_loss", "reversed_sampler",
    "sample_epoch", "class_sorted_table", "class_probabilities",
    # BatchFormer
    "batchformer_features", "batchformer_logits", "batch_attention",
    # DRLoc
    "drloc_lambda", "drloc_loss", "drloc_l1_loss", "drloc_ce_loss", "drloc_cbr_loss",
    "drloc_positions", "drloc_targets", "drloc_pairs", "drloc_gather", "drloc_first_layer",
    # SDMP
    "sdmp_mix", "sdmp_lam_eff", "mixture_nll", "sdmp_ms_loss", "sdmp_mm_weights", "sdmp_mm_loss",
    "sdmp_moco_terms", "sdmp_moco_loss", "sdmp_dino_loss", "soft_cross_entropy",
    "batch_mix", "sample_mix_params", "partner_index",
    # MoCo v3
    "moco_infonce", "moco_loss",
    # DINO
    "dino_loss", "teacher_probs", "teacher_temperature", "update_center", "teacher_entropy", "clip_gradients_",
    "local_crop_size",
    # the SSL bases' shared pieces
    "make_views", "make_local_views", "normalize_views", "cosine_momentum", "ema_update_", "knn_scores",
    "train_linear",
]
