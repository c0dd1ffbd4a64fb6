"""An encoder-decoder Transformer that converts to CTranslate2 without tricks.

Every module mirrors a CTranslate2 spec (``ctranslate2.specs.TransformerSpec``):

- embeddings are scaled by sqrt(width) (``scale_embeddings``) and summed with a
  sinusoidal table (sin half then cos half, positions from 0), which the exporter
  writes out verbatim, so no formula has to agree between the two sides;
- attention keeps separate q, k and v projections (the exporter fuses them;
  weight distillation generates each one on its own);
- cross-attention projects the encoder width to the decoder width, so a
  student may pair a wide encoder with a narrow decoder;
- pre-norm models end each stack with a layer norm, post-norm models do not;
- the output projection may carry a bias (``output_bias``), CTranslate2's
  ``decoder.projection.bias``.

The options beyond wdserve's own defaults (``activation="silu"``,
``position_encoding="marian"``, ``output_bias``) are what a pretrained Marian
model needs (``distill.marian``).

Source sequences are ``pieces + [</s>]`` (CTranslate2's ``add_source_eos``);
decoder input is ``[<s>] + pieces`` and the target is ``pieces + [</s>]``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")

# Named by their torch functions: gelu is the erf form, silu is x * sigmoid(x) (Marian's "swish")
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}

# Both tables are [sin(p * t_i) | cos(p * t_i)] for positions p = 0, 1, ... and i < dim/2; they differ in
# the frequencies t_i:
# - "tensor2tensor" (CTranslate2's and fairseq's own): t_i = 10000 ** (-i / (dim/2 - 1));
# - "marian" (Marian's, and transformers' MarianSinusoidalPositionalEmbedding):
#   t_i = 10000 ** (-2i / dim), the formula of "Attention Is All You Need".
POSITION_ENCODINGS = ("tensor2tensor", "marian")


@dataclass
class ModelConfig:
    vocab_size: int
    enc_layers: int = 6
    enc_dim: int = 512
    enc_heads: int = 8
    enc_ffn: int = 2048
    dec_layers: int = 6
    dec_dim: int = 512
    dec_heads: int = 8
    dec_ffn: int = 2048
    pre_norm: bool = True
    activation: str = "relu"  # one of ACTIVATIONS
    share_embeddings: bool = True  # encoder and decoder share one table (needs enc_dim == dec_dim)
    tie_output: bool = True  # output projection reuses the decoder embedding table
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    max_positions: int = 512
    layer_norm_eps: float = 1e-5
    position_encoding: str = "tensor2tensor"  # one of POSITION_ENCODINGS
    scale_embeddings: bool = True  # token embeddings times sqrt(width) before adding positions
    output_bias: bool = False  # the output projection adds a per-token bias

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.position_encoding not in POSITION_ENCODINGS:
            raise ValueError(f"position_encoding must be one of {POSITION_ENCODINGS}, "
                             f"got {self.position_encoding!r}")
        for side in ("enc", "dec"):
            dim, heads = getattr(self, f"{side}_dim"), getattr(self, f"{side}_heads")
            if dim % heads:
                raise ValueError(f"{side}_dim={dim} is not divisible by {side}_heads={heads}")
            if dim % 2:
                raise ValueError(f"{side}_dim={dim} must be even for sinusoidal positions")
        if self.share_embeddings and self.enc_dim != self.dec_dim:
            raise ValueError(
                f"share_embeddings needs enc_dim == dec_dim (got {self.enc_dim} and {self.dec_dim})"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        return config_from_dict(cls, values, "model")


def config_from_dict(cls, values: dict, what: str):
    """``cls(**values)`` for a config dataclass, naming unknown keys instead of a TypeError."""
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown {what} config fields: {sorted(unknown)} (known: {sorted(known)})")
    return cls(**values)


def sinusoidal_table(num_positions: int, dim: int, encoding: str = "tensor2tensor") -> torch.Tensor:
    """Sinusoidal encodings [sin(p * t_i) | cos(p * t_i)], p = 0, 1, ... (``POSITION_ENCODINGS``)."""
    half = dim // 2
    steps = torch.arange(half, dtype=torch.float64)
    if encoding == "tensor2tensor":
        timescales = torch.exp(steps * -(math.log(10000.0) / max(half - 1, 1)))
    elif encoding == "marian":
        timescales = 1.0 / torch.pow(10000.0, 2.0 * steps / dim)
    else:
        raise ValueError(f"unknown position encoding {encoding!r}; expected one of {POSITION_ENCODINGS}")
    scaled = torch.arange(num_positions, dtype=torch.float64)[:, None] * timescales[None, :]
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=1).float()  # (P, dim)


class MultiHeadAttention(nn.Module):
    """Attention from a query stream of width ``dim`` to a key/value stream of width ``kv_dim``."""

    def __init__(self, dim: int, kv_dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(kv_dim, dim)
        self.v_proj = nn.Linear(kv_dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # (B, nh, T, hs)

    def project_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._split(self.k_proj(memory)), self._split(self.v_proj(memory))

    def forward(
        self,
        query: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """``mask`` is boolean, True where attention is allowed, broadcastable to (B, nh, Tq, Tk)."""
        b, t, d = query.shape
        q = self._split(self.q_proj(query))  # (B, nh, Tq, hs)
        k, v = kv
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh, Tq, hs)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, activation: str, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.activation = ACTIVATIONS[activation]
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(self.activation(self.fc1(x))))


class Sublayer(nn.Module):
    """Residual wrapper: pre-norm ``x + f(norm(x))`` or post-norm ``norm(x + f(x))``."""

    def __init__(self, dim: int, pre_norm: bool, dropout: float, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.pre_norm = pre_norm
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, fn) -> torch.Tensor:
        if self.pre_norm:
            return x + self.dropout(fn(self.norm(x)))
        return self.norm(x + self.dropout(fn(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.enc_dim
        self.self_attn = MultiHeadAttention(d, d, cfg.enc_heads, cfg.attention_dropout)
        self.self_attn_block = Sublayer(d, cfg.pre_norm, cfg.dropout, cfg.layer_norm_eps)
        self.ffn = FeedForward(d, cfg.enc_ffn, cfg.activation, cfg.activation_dropout)
        self.ffn_block = Sublayer(d, cfg.pre_norm, cfg.dropout, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.self_attn_block(x, lambda h: self.self_attn(h, self.self_attn.project_kv(h), mask))
        return self.ffn_block(x, self.ffn)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.dec_dim
        self.self_attn = MultiHeadAttention(d, d, cfg.dec_heads, cfg.attention_dropout)
        self.self_attn_block = Sublayer(d, cfg.pre_norm, cfg.dropout, cfg.layer_norm_eps)
        self.cross_attn = MultiHeadAttention(d, cfg.enc_dim, cfg.dec_heads, cfg.attention_dropout)
        self.cross_attn_block = Sublayer(d, cfg.pre_norm, cfg.dropout, cfg.layer_norm_eps)
        self.ffn = FeedForward(d, cfg.dec_ffn, cfg.activation, cfg.activation_dropout)
        self.ffn_block = Sublayer(d, cfg.pre_norm, cfg.dropout, cfg.layer_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        self_mask: torch.Tensor | None,
        memory_kv: tuple[torch.Tensor, torch.Tensor],
        memory_mask: torch.Tensor,
        cache: dict | None = None,
    ) -> torch.Tensor:
        def self_attention(h: torch.Tensor) -> torch.Tensor:
            k, v = self.self_attn.project_kv(h)
            if cache is not None:  # incremental decoding: append this step's keys and values
                if "k" in cache:
                    k = torch.cat([cache["k"], k], dim=2)
                    v = torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v
            return self.self_attn(h, (k, v), self_mask)

        x = self.self_attn_block(x, self_attention)
        x = self.cross_attn_block(x, lambda h: self.cross_attn(h, memory_kv, memory_mask))
        return self.ffn_block(x, self.ffn)


class Embedding(nn.Module):
    """Token table (scaled by sqrt(width) unless ``scale`` is off) plus fixed sinusoidal positions."""

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        max_positions: int,
        dropout: float,
        position_encoding: str = "tensor2tensor",
        scale: bool = True,
    ) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, dim, padding_idx=PAD_ID)
        table = sinusoidal_table(max_positions, dim, position_encoding)
        self.register_buffer("positions", table, persistent=False)
        self.scale = math.sqrt(dim) if scale else 1.0
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
        t = tokens.size(1)
        if offset + t > self.positions.size(0):
            raise ValueError(
                f"sequence of {offset + t} positions exceeds max_positions={self.positions.size(0)}"
            )
        x = self.tokens(tokens) * self.scale + self.positions[offset : offset + t]
        return self.dropout(x)


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig, embedding: Embedding) -> None:
        super().__init__()
        self.embedding = embedding
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.enc_layers))
        self.final_norm = nn.LayerNorm(cfg.enc_dim, eps=cfg.layer_norm_eps) if cfg.pre_norm else None

    def forward(
        self, src: torch.Tensor, return_hidden: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Returns (memory (B, S, enc_dim), key mask (B, 1, 1, S), per-layer outputs if asked)."""
        mask = (src != PAD_ID)[:, None, None, :]  # (B, 1, 1, S)
        x = self.embedding(src)
        hidden = []
        for layer in self.layers:
            x = layer(x, mask)
            if return_hidden:
                hidden.append(x)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x, mask, hidden


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, embedding: Embedding) -> None:
        super().__init__()
        self.embedding = embedding
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.dec_layers))
        self.final_norm = nn.LayerNorm(cfg.dec_dim, eps=cfg.layer_norm_eps) if cfg.pre_norm else None
        self.output_proj = nn.Linear(cfg.dec_dim, cfg.vocab_size, bias=cfg.output_bias)
        if cfg.tie_output:
            self.output_proj.weight = embedding.tokens.weight

    def forward(
        self,
        tgt_in: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor,
        state: DecoderState | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits (B, T, V). With ``state``, ``tgt_in`` holds only the new step(s).

        With ``return_hidden`` (teacher forcing only), (logits, each layer's output (B, T, dec_dim)
        before the final norm), the states the encoder's ``return_hidden`` gives for its side.
        """
        if return_hidden and state is not None:
            raise ValueError("return_hidden is for teacher-forced decoding, not with a DecoderState")
        offset = 0 if state is None else state.length
        x = self.embedding(tgt_in, offset)
        t = tgt_in.size(1)
        if state is None:
            self_mask = torch.ones(t, t, dtype=torch.bool, device=tgt_in.device).tril()
        else:  # one new step attends to everything cached so far
            self_mask = None if t == 1 else torch.ones(t, offset + t, dtype=torch.bool,
                                                       device=tgt_in.device).tril(offset)
        hidden = []
        for i, layer in enumerate(self.layers):
            if state is None:
                memory_kv = layer.cross_attn.project_kv(memory)
                cache = None
            else:
                if len(state.memory_kv) <= i:
                    state.memory_kv.append(layer.cross_attn.project_kv(memory))
                memory_kv, cache = state.memory_kv[i], state.self_kv[i]
            x = layer(x, self_mask, memory_kv, memory_mask, cache)
            if return_hidden:
                hidden.append(x)  # (B, T, dec_dim)
        if state is not None:
            state.length += t
        if self.final_norm is not None:
            x = self.final_norm(x)
        logits = self.output_proj(x)  # (B, T, V)
        return (logits, hidden) if return_hidden else logits


class DecoderState:
    """Cached keys and values for incremental decoding; ``reorder`` follows beam selection."""

    def __init__(self, num_layers: int) -> None:
        self.length = 0
        self.self_kv: list[dict] = [{} for _ in range(num_layers)]
        self.memory_kv: list[tuple[torch.Tensor, torch.Tensor]] = []

    def reorder(self, index: torch.Tensor) -> None:
        for cache in self.self_kv:
            for key in cache:
                cache[key] = cache[key].index_select(0, index)
        self.memory_kv = [(k.index_select(0, index), v.index_select(0, index))
                          for k, v in self.memory_kv]


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        src_embedding = Embedding(cfg.vocab_size, cfg.enc_dim, cfg.max_positions, cfg.dropout,
                                  cfg.position_encoding, cfg.scale_embeddings)
        tgt_embedding = Embedding(cfg.vocab_size, cfg.dec_dim, cfg.max_positions, cfg.dropout,
                                  cfg.position_encoding, cfg.scale_embeddings)
        if cfg.share_embeddings:
            # One table, two modules: a module reachable by two paths trips torch.func.functional_call
            # (distill.wd runs students through it), which restores a shared module's tensors wrongly.
            tgt_embedding.tokens.weight = src_embedding.tokens.weight
        self.encoder = Encoder(cfg, src_embedding)
        self.decoder = Decoder(cfg, tgt_embedding)
        self.apply(_init_linear)
        # Tables last: a tied output projection must end up with the embedding's init.
        _init_table(self.decoder.output_proj.weight)
        _init_table(src_embedding.tokens.weight)
        _init_table(tgt_embedding.tokens.weight)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, T, V) for source (B, S) and decoder input (B, T)."""
        memory, memory_mask, _ = self.encoder(src)
        return self.decoder(tgt_in, memory, memory_mask)

    def forward_with_hidden(
        self, src: torch.Tensor, tgt_in: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """``forward``'s logits, plus each encoder layer's output (B, S, enc_dim) and each decoder
        layer's (B, T, dec_dim), both before their stack's final norm (intermediate-layer KD reads them)."""
        memory, memory_mask, encoder_hidden = self.encoder(src, return_hidden=True)
        logits, decoder_hidden = self.decoder(tgt_in, memory, memory_mask, return_hidden=True)
        return logits, encoder_hidden, decoder_hidden

    def start_state(self) -> DecoderState:
        return DecoderState(self.config.dec_layers)


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _init_table(weight: torch.Tensor) -> None:
    nn.init.normal_(weight, mean=0.0, std=weight.size(1) ** -0.5)
    with torch.no_grad():
        weight[PAD_ID].zero_()


def count_parameters(model: nn.Module) -> int:
    """Distinct trainable values (a tied table counts once)."""
    return sum(p.numel() for p in model.parameters())
