"""Checkpoint -> CTranslate2 model directory.

The converter mirrors ``distill.model`` one function per module kind, in the
manner of CTranslate2's own fairseq converter: ``set_linear``,
``set_layer_norm``, ``set_multi_head_attention``, ... composed into
``set_encoder`` and ``set_decoder``. Every spec weight is filled from a named
module; nothing is guessed.

The mapping, by module:

- ``Embedding.tokens`` -> ``embeddings.weight`` (CTranslate2 multiplies by
  sqrt(width) itself when the stack's ``scale_embeddings`` is set, which follows
  ``config.scale_embeddings``), ``Embedding.positions`` ->
  ``position_encodings.encodings`` written verbatim (so either of
  ``distill.model``'s position formulas needs nothing here);
- self-attention ``q/k/v_proj`` -> ``linear[0]`` (fused along the output
  dimension, q then k then v), ``out_proj`` -> ``linear[1]``;
- cross-attention ``q_proj`` -> ``linear[0]``, ``k/v_proj`` -> ``linear[1]``
  (fused; its input width is the encoder's, so a narrow decoder needs nothing
  special), ``out_proj`` -> ``linear[2]``;
- ``Sublayer.norm`` -> the ``layer_norm`` of the attention or feed-forward spec:
  CTranslate2 applies it before the sublayer (pre-norm) or after the residual
  (post-norm), exactly as ``Sublayer`` does;
- ``final_norm`` -> the stack's ``layer_norm`` (pre-norm only);
- ``output_proj`` -> ``decoder.projection``, with its bias when the model has
  one (``output_bias``, an imported Marian teacher's, whose ``<pad>`` and ``<s>``
  entries keep the suppression they have in PyTorch); a tied table is stored
  once because CTranslate2 aliases identical variables;
- ``config.activation`` -> the stacks' activation (``silu`` is CTranslate2's
  ``SWISH``, x * sigmoid(x)).

The vocabulary's SentencePiece models go beside the model: ``sentencepiece.model``
for wdserve's joint vocabulary, ``source.spm`` and ``target.spm`` for a split one
(an imported Marian teacher's and its students'); ``model.json`` names them.

Arrays handed to the spec are always fresh copies: int8 quantization scales
them in place, and a spec built from views would corrupt the live model.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from ctranslate2.converters import Converter
from ctranslate2.specs import common_spec, transformer_spec

from wdserve.artifacts import (
    EXPORT_SOURCE_VOCAB,
    EXPORT_TARGET_VOCAB,
    EXPORT_VOCAB,
    QUANTIZATIONS,
    ExportDir,
    ExportInfo,
)
from wdserve.distill.checkpoint import file_sha256, read_checkpoint
from wdserve.distill.model import (
    SPECIAL_TOKENS,
    Embedding,
    FeedForward,
    ModelConfig,
    MultiHeadAttention,
    Transformer,
    count_parameters,
)
from wdserve.distill.vocab import Vocab
from wdserve.errors import WdserveError

log = logging.getLogger(__name__)

ACTIVATIONS = {  # distill.model's names; GELU is the erf form, SWISH is x * sigmoid(x) (torch's silu)
    "relu": common_spec.Activation.RELU,
    "gelu": common_spec.Activation.GELU,
    "silu": common_spec.Activation.SWISH,
}


class ExportError(WdserveError, ValueError):
    """A checkpoint that cannot become a CTranslate2 model, or an output that cannot be written."""


# ---------------------------------------------------------------------------------------------------
# Loading a checkpoint the converter can trust


def load_exportable(checkpoint: Path) -> tuple[Transformer, Vocab, dict]:
    """Rebuilds the model of ``checkpoint``, refusing anything the converter cannot represent.

    Returns (model in eval mode on CPU, vocab, checkpoint dict).
    """
    checkpoint = Path(checkpoint)
    try:
        state = read_checkpoint(checkpoint)
    except (FileNotFoundError, ValueError) as err:
        raise ExportError(str(err)) from err
    try:
        config = ModelConfig.from_dict(dict(state["config"]))
    except (TypeError, ValueError) as err:
        raise ExportError(f"{checkpoint}: model config cannot be exported: {err}") from err
    try:
        vocab = Vocab(state["vocab"])
    except (RuntimeError, ValueError, TypeError) as err:
        raise ExportError(f"{checkpoint}: embedded vocabulary is unusable: {err}") from err
    if len(vocab) != config.vocab_size:
        raise ExportError(
            f"{checkpoint}: the vocabulary has {len(vocab)} pieces but config.vocab_size is "
            f"{config.vocab_size}; the CTranslate2 vocabulary must match the embedding table"
        )
    model = Transformer(config)
    _check_state_dict(checkpoint, model.state_dict(), state["model"])
    model.load_state_dict(state["model"])
    return model.eval(), vocab, state


def _check_state_dict(checkpoint: Path, expected: dict, found: dict) -> None:
    problems = []
    unknown = sorted(set(found) - set(expected))
    missing = sorted(set(expected) - set(found))
    if unknown:
        problems.append(f"{len(unknown)} tensors the model class does not have, e.g. {unknown[:3]}")
    if missing:
        problems.append(f"{len(missing)} missing tensors, e.g. {missing[:3]}")
    for key in sorted(set(expected) & set(found)):
        if tuple(found[key].shape) != tuple(expected[key].shape):
            problems.append(f"{key} has shape {tuple(found[key].shape)}, config implies "
                            f"{tuple(expected[key].shape)}")
    if problems:
        raise ExportError(
            f"{checkpoint} does not hold a plain distill.model.Transformer: " + "; ".join(problems)
            + " (export a model checkpoint such as checkpoint_best.pt, not a training wrapper's state)"
        )


# ---------------------------------------------------------------------------------------------------
# Spec filling: one function per module kind


def _array(tensor: torch.Tensor) -> np.ndarray:
    # A copy, always: quantization rewrites the arrays it is given in place.
    return tensor.detach().to(device="cpu", dtype=torch.float32).numpy().copy()


def set_linear(spec: common_spec.LinearSpec, linear: torch.nn.Linear) -> None:
    spec.weight = _array(linear.weight)  # (out, in), the layout CTranslate2 stores
    if linear.bias is not None:
        spec.bias = _array(linear.bias)


def set_fused_linear(spec: common_spec.LinearSpec, linears: list[torch.nn.Linear]) -> None:
    """Stacks several projections of one input along the output dimension."""
    spec.weight = np.concatenate([_array(lin.weight) for lin in linears], axis=0)
    spec.bias = np.concatenate([_array(lin.bias) for lin in linears], axis=0)


def set_layer_norm(spec: common_spec.LayerNormSpec, norm: torch.nn.LayerNorm) -> None:
    spec.gamma = _array(norm.weight)
    spec.beta = _array(norm.bias)


def set_embeddings(spec: common_spec.EmbeddingsSpec, embedding: Embedding) -> None:
    spec.weight = _array(embedding.tokens.weight)


def set_position_encodings(spec: transformer_spec.PositionEncoderSpec, embedding: Embedding) -> None:
    spec.encodings = _array(embedding.positions)  # (max_positions, dim), position 0 first


def set_multi_head_attention(spec, attention: MultiHeadAttention, self_attention: bool) -> None:
    if self_attention:
        set_fused_linear(spec.linear[0], [attention.q_proj, attention.k_proj, attention.v_proj])
    else:
        set_linear(spec.linear[0], attention.q_proj)
        set_fused_linear(spec.linear[1], [attention.k_proj, attention.v_proj])
    set_linear(spec.linear[-1], attention.out_proj)


def set_ffn(spec: transformer_spec.FeedForwardSpec, ffn: FeedForward, norm: torch.nn.LayerNorm) -> None:
    set_layer_norm(spec.layer_norm, norm)
    set_linear(spec.linear_0, ffn.fc1)
    set_linear(spec.linear_1, ffn.fc2)


def set_encoder_layer(spec: transformer_spec.TransformerEncoderLayerSpec, layer) -> None:
    set_multi_head_attention(spec.self_attention, layer.self_attn, self_attention=True)
    set_layer_norm(spec.self_attention.layer_norm, layer.self_attn_block.norm)
    set_ffn(spec.ffn, layer.ffn, layer.ffn_block.norm)


def set_decoder_layer(spec: transformer_spec.TransformerDecoderLayerSpec, layer) -> None:
    set_multi_head_attention(spec.self_attention, layer.self_attn, self_attention=True)
    set_layer_norm(spec.self_attention.layer_norm, layer.self_attn_block.norm)
    set_multi_head_attention(spec.attention, layer.cross_attn, self_attention=False)
    set_layer_norm(spec.attention.layer_norm, layer.cross_attn_block.norm)
    set_ffn(spec.ffn, layer.ffn, layer.ffn_block.norm)


def set_encoder(spec: transformer_spec.TransformerEncoderSpec, encoder) -> None:
    set_embeddings(spec.embeddings[0], encoder.embedding)
    set_position_encodings(spec.position_encodings, encoder.embedding)
    for layer_spec, layer in zip(spec.layer, encoder.layers, strict=True):
        set_encoder_layer(layer_spec, layer)
    if encoder.final_norm is not None:
        set_layer_norm(spec.layer_norm, encoder.final_norm)


def set_decoder(spec: transformer_spec.TransformerDecoderSpec, decoder) -> None:
    set_embeddings(spec.embeddings, decoder.embedding)
    set_position_encodings(spec.position_encodings, decoder.embedding)
    for layer_spec, layer in zip(spec.layer, decoder.layers, strict=True):
        set_decoder_layer(layer_spec, layer)
    if decoder.final_norm is not None:
        set_layer_norm(spec.layer_norm, decoder.final_norm)
    set_linear(spec.projection, decoder.output_proj)


def build_spec(config: ModelConfig) -> transformer_spec.TransformerSpec:
    """Empty spec for ``config``. Encoder and decoder are declared separately because
    ``TransformerSpec.from_config`` takes one head count and students may differ."""
    activation = ACTIVATIONS[config.activation]
    encoder = transformer_spec.TransformerEncoderSpec(
        config.enc_layers, config.enc_heads, pre_norm=config.pre_norm, activation=activation
    )
    decoder = transformer_spec.TransformerDecoderSpec(
        config.dec_layers, config.dec_heads, pre_norm=config.pre_norm, activation=activation
    )
    for stack in (encoder, decoder):
        stack.scale_embeddings = config.scale_embeddings  # token rows times sqrt(width), or as they are
    return transformer_spec.TransformerSpec(encoder, decoder)


class TransformerConverter(Converter):
    """A ``ctranslate2.converters.Converter`` for a loaded ``distill.model.Transformer``."""

    def __init__(self, model: Transformer, vocab: Vocab) -> None:
        self.model = model
        self.vocab = vocab

    def _load(self) -> transformer_spec.TransformerSpec:
        config = self.model.config
        spec = build_spec(config)
        with torch.no_grad():
            set_encoder(spec.encoder, self.model.encoder)
            set_decoder(spec.decoder, self.model.decoder)
        tokens = self.vocab.tokens
        spec.register_source_vocabulary(tokens)
        spec.register_target_vocabulary(tokens)
        # Sources are pieces + </s>; decoding starts from <s> (distill.model's conventions).
        spec.config.unk_token, spec.config.bos_token, spec.config.eos_token = SPECIAL_TOKENS[1:]
        spec.config.decoder_start_token = SPECIAL_TOKENS[2]
        spec.config.add_source_bos = False
        spec.config.add_source_eos = True
        spec.config.layer_norm_epsilon = config.layer_norm_eps
        return spec


# ---------------------------------------------------------------------------------------------------
# Public entry points


def convert_checkpoint(
    checkpoint: Path,
    out_dir: Path,
    quantization: str = "float32",
    name: str | None = None,
    force: bool = False,
) -> Path:
    """Writes a self-contained CTranslate2 directory for ``checkpoint`` and returns its path.

    ``out_dir`` receives the CTranslate2 model, the SentencePiece model(s) (``write_vocab``) and
    ``model.json``.
    An existing non-empty ``out_dir`` is refused unless ``force``. The directory is built
    beside ``out_dir`` and renamed into place, so a failure never leaves half a model.
    """
    checkpoint = Path(checkpoint)
    model, vocab, state = load_exportable(checkpoint)
    return _write_model_dir(model, vocab, state, file_sha256(checkpoint), checkpoint, Path(out_dir),
                            quantization, name, force)


def export_all(
    checkpoint: Path,
    out_root: Path,
    quantizations: list[str],
    name: str | None = None,
    force: bool = False,
) -> dict[str, Path]:
    """Exports one checkpoint to several quantizations: ``out_root/<name>-<quant>/`` for each,
    or ``out_root`` itself when only one is asked for."""
    quantizations = list(dict.fromkeys(quantizations))
    if not quantizations:
        raise ExportError("no quantization given")
    for quantization in quantizations:
        _check_quantization(quantization)
    checkpoint, out_root = Path(checkpoint), Path(out_root)
    model, vocab, state = load_exportable(checkpoint)
    name = name or _default_name(state, checkpoint)
    sha = file_sha256(checkpoint)
    outputs = {}
    for quantization in quantizations:
        out = out_root if len(quantizations) == 1 else out_root / f"{name}-{quantization}"
        outputs[quantization] = _write_model_dir(model, vocab, state, sha, checkpoint, out, quantization,
                                                 name, force)
    return outputs


def write_vocab(out_dir: Path, vocab: Vocab) -> tuple[str, str]:
    """Writes the SentencePiece model(s) of ``vocab`` into ``out_dir``; returns the (source, target)
    file names for ``model.json``: one joint ``sentencepiece.model``, or ``source.spm`` and ``target.spm``.
    The model ids of a split vocabulary are the CTranslate2 vocabulary's (the token list), so its
    SentencePiece models only cut and join pieces."""
    if vocab.is_joint:
        (out_dir / EXPORT_VOCAB).write_bytes(vocab.source_model_bytes)
        return EXPORT_VOCAB, EXPORT_VOCAB
    (out_dir / EXPORT_SOURCE_VOCAB).write_bytes(vocab.source_model_bytes)
    (out_dir / EXPORT_TARGET_VOCAB).write_bytes(vocab.target_model_bytes)
    return EXPORT_SOURCE_VOCAB, EXPORT_TARGET_VOCAB


def _check_quantization(quantization: str) -> None:
    if quantization not in QUANTIZATIONS:
        raise ExportError(f"unknown quantization {quantization!r}; choose from {', '.join(QUANTIZATIONS)}")


def _default_name(state: dict, checkpoint: Path) -> str:
    return str(state.get("meta", {}).get("name") or checkpoint.stem)


def _write_model_dir(
    model: Transformer,
    vocab: Vocab,
    state: dict,
    sha256: str,
    checkpoint: Path,
    out_dir: Path,
    quantization: str,
    name: str | None,
    force: bool,
) -> Path:
    _check_quantization(quantization)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"output path {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ExportError(f"output directory {out_dir} is not empty; pass force=True (--force) to replace it")
    meta = state.get("meta", {})
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; a server running as another user must read it
        try:
            TransformerConverter(model, vocab).convert(str(tmp), quantization=quantization, force=True)
        except (ValueError, NotImplementedError) as err:
            raise ExportError(f"{checkpoint}: CTranslate2 rejected the converted model: {err}") from err
        source_vocab, target_vocab = write_vocab(tmp, vocab)
        ExportDir.write_info(tmp, ExportInfo(
            name=name or _default_name(state, checkpoint),
            quantization=quantization,
            source_lang=meta.get("source_lang"),
            target_lang=meta.get("target_lang"),
            method=meta.get("method"),
            architecture=model.config.to_dict(),
            parameters=count_parameters(model),
            checkpoint=str(checkpoint),
            checkpoint_sha256=sha256,
            teacher_sha256=meta.get("teacher_sha256"),
            exported_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            source_vocab=source_vocab,
            target_vocab=target_vocab,
        ))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s (%s) -> %s", checkpoint, quantization, out_dir)
    return out_dir
