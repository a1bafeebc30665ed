"""Neural-network layers built on batchkin's ops.

:class:`BatchFormerLayer` is a post-norm transformer encoder layer over the batch (the B
samples of a mini-batch are ONE sequence of B tokens, METHODS.md section 2), with the
parameter names and shapes of ``nn.TransformerEncoderLayer`` (its state dict loads as
is); :class:`BatchFormer` stacks such layers. The attention core is
:func:`batchkin.kernels.batch_attention.batch_attention`. In training, every dropout
of a forward comes from one seed: the attention probabilities use
``rng.derive_key(seed)`` (batch attention's key), the three feature dropouts the
streams ``STREAM_*`` folded with the seed (:func:`layer_dropout_mask`); the feature
masks are hashed together and each residual dropout is fused with its residual add.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from batchkin.kernels import checks, rng
from batchkin.kernels.batch_attention import batch_attention
from batchkin.kernels.rng_mask import keep_mask, scaled_keep_masks

__all__ = [
    "STREAM_RESIDUAL1", "STREAM_FFN", "STREAM_RESIDUAL2",
    "BatchFormer", "BatchFormerLayer", "BatchSelfAttention", "draw_seed", "layer_dropout_mask",
]  # fmt: skip

# Counter-RNG streams of a layer's feature dropouts, folded with the layer's seed.
STREAM_RESIDUAL1 = 1  # on the attention block's output, before the first residual add
STREAM_FFN = 2  # inside the feed-forward block, after the activation
STREAM_RESIDUAL2 = 3  # on the feed-forward block's output, before the second residual add


def layer_dropout_mask(seed: int, stream: int, shape: tuple[int, ...], p: float, device=None) -> Tensor:
    """Keep mask of one of a layer's feature dropouts.

    ``keep.view(-1)[i] = rng.uniform(rng.derive_key(seed, stream), i) >= float32(p)``.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    return keep_mask(rng.derive_key(seed, stream), list(shape), float(p), device)


def draw_seed(generator: Optional[torch.Generator] = None) -> int:
    """A 62-bit dropout seed from ``generator`` (the default CPU generator when None)."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())


class BatchSelfAttention(nn.Module):
    """Multi-head self-attention over the batch, parameters named as ``nn.MultiheadAttention``'s."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"nhead ({num_heads}) must divide d_model ({embed_dim})")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self._reset_parameters()

    def _reset_parameters(self):
        # As nn.MultiheadAttention: xavier-uniform input projection, zero biases.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: Tensor, dropout_p: float = 0.0, seed: int = 0) -> Tensor:
        B, C = x.shape
        h, d = self.num_heads, self.head_dim
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, 3C]
        q, k, v = qkv.view(B, 3, h, d).permute(1, 2, 0, 3)  # each [h, B, d], strided views
        attn = batch_attention(q, k, v, dropout_p=dropout_p, seed=seed)  # [h, B, d]
        attn = attn.transpose(0, 1).reshape(B, C)
        return self.out_proj(attn)


class BatchFormerLayer(nn.Module):
    """Post-norm transformer encoder layer over the batch dimension.

    Computes what ``nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward,
    dropout)`` (ReLU, post-norm) computes on ``x.unsqueeze(1)``, with the same
    parameter names and shapes, so ``load_state_dict`` works both ways::

        x = norm1(x + dropout1(self_attn(x)))
        x = norm2(x + dropout2(linear2(dropout(relu(linear1(x))))))

    Input and output ``[B, C]``. In training mode every dropout (attention
    probabilities, inside the FFN, both residuals) is driven by one seed per
    forward, drawn from ``generator`` (or the default generator when None) or
    given as ``seed``: the attention mask is ``dropout_keep_mask(derive_key(seed),
    ...)`` and the feature masks are :func:`layer_dropout_mask` with the streams
    ``STREAM_RESIDUAL1``, ``STREAM_FFN``, ``STREAM_RESIDUAL2``. Evaluation mode uses
    no dropout (the plugin decides whether the layer runs at all at evaluation).
    """

    def __init__(self, d_model: int, nhead: int = 4, dim_feedforward: Optional[int] = None, dropout: float = 0.5,
                 layer_norm_eps: float = 1e-5):  # fmt: skip
        super().__init__()
        checks.check_int("d_model", d_model, min_value=1)
        checks.check_int("nhead", nhead, min_value=1)
        if dim_feedforward is None:
            dim_feedforward = d_model
        checks.check_int("dim_feedforward", dim_feedforward, min_value=1)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1); got {dropout!r}")
        self.d_model = d_model
        self.nhead = nhead
        self.dropout_p = float(dropout)
        self.self_attn = BatchSelfAttention(d_model, nhead)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)

    def forward(self, x: Tensor, generator: Optional[torch.Generator] = None, *, seed: Optional[int] = None) -> Tensor:
        checks.check_tensor("x", x, ndim=2, shape=(None, self.d_model), min_numel=1)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        p = self.dropout_p if self.training else 0.0
        if p > 0.0:
            seed = draw_seed(generator) if seed is None else checks.check_int("seed", seed)
        else:
            seed = 0
        sa = self.self_attn(x, dropout_p=p, seed=seed)
        if p <= 0.0:  # evaluation (or dropout 0): no masks
            x = self.norm1(x + sa)
            return self.norm2(x + self.linear2(F.relu(self.linear1(x))))
        B, C = x.shape
        streams = (STREAM_RESIDUAL1, STREAM_FFN, STREAM_RESIDUAL2)
        shapes = [(B, C), (B, self.linear1.out_features), (B, C)]
        keys = [rng.derive_key(seed, stream) for stream in streams]
        drop1, drop_ffn, drop2 = scaled_keep_masks(keys, shapes, p, x.device, x.dtype)
        x = self.norm1(torch.addcmul(x, sa, drop1))  # x + dropout1(sa): the residual add fused with the mask
        ff = self.linear2(F.relu(self.linear1(x)) * drop_ffn)
        return self.norm2(torch.addcmul(x, ff, drop2))


class BatchFormer(nn.Module):
    """A stack of ``num_layers`` :class:`BatchFormerLayer` (the encoder; no eval-time bypass).

    ``forward(x, generator=None, *, seed=None)``: with ``seed``, layer ``i`` uses
    the seed ``rng.derive_key(seed, i)``; otherwise each layer draws its own from
    ``generator``.
    """

    def __init__(self, d_model: int, num_layers: int = 1, nhead: int = 4, dim_feedforward: Optional[int] = None,
                 dropout: float = 0.5, layer_norm_eps: float = 1e-5):  # fmt: skip
        super().__init__()
        checks.check_int("num_layers", num_layers, min_value=1)
        self.layers = nn.ModuleList(
            BatchFormerLayer(d_model, nhead, dim_feedforward, dropout, layer_norm_eps) for _ in range(num_layers)
        )

    def forward(self, x: Tensor, generator: Optional[torch.Generator] = None, *, seed: Optional[int] = None) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, generator, seed=None if seed is None else rng.derive_key(seed, i))
        return x
