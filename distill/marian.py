"""A pretrained Marian teacher (Hugging Face ``MarianMTModel`` format, e.g. OPUS-MT) as a wdserve checkpoint.

``import_marian(source, out_dir)`` loads a Hugging Face model id or a local directory with
``transformers`` and writes ``out_dir/checkpoint_best.pt``, a teacher checkpoint like the ones
wdserve trains (config and vocabulary inside), and ``out_dir/pretrained.json`` saying where it came
from. ``from_marian(model, tokenizer)`` does the conversion in memory.

What a Marian model is, read from transformers' ``modeling_marian.py``, and what it becomes:

- post-norm layers (``x = norm(x + f(x))``), no final stack norms -> ``pre_norm=False``;
- static sinusoidal positions from 0, sin in the first half of the channels and cos in the second,
  frequencies ``10000 ** (-2i / d_model)`` -> ``position_encoding="marian"`` (the import compares
  the table with transformers' own);
- token embeddings times sqrt(d_model) when ``config.scale_embedding`` (OPUS-MT: yes) ->
  ``scale_embeddings``;
- ``activation_function`` "swish" (OPUS-MT) -> ``activation="silu"``, the same function; "relu" and
  "gelu" (the erf form in both) keep their names;
- one table for the encoder, the decoder and the output (``share_encoder_decoder_embeddings``,
  ``tie_word_embeddings``) -> ``share_embeddings``, ``tie_output``;
- logits ``h E^T + final_logits_bias`` -> ``output_bias``;
- ids ``</s>`` = 0, ``<unk>`` = 1, ``<pad>`` = the last id, and the decoder starts from ``<pad>``
  (``decoder_start_token_id``); sources end in ``</s>``.

Ids are remapped into wdserve's, so training, decoding and export keep their fixed special ids
(``distill.model.SPECIAL_TOKENS``): the tokens are ``<pad> <unk> <s> </s>`` followed by Marian's
other tokens in Marian's order, and the rows of every vocabulary-sized tensor move with them:

- ``<unk>`` and ``</s>`` take Marian's ``<unk>`` and ``</s>`` rows;
- ``<s>``, where wdserve's decoder starts, takes Marian's ``<pad>`` row, where Marian's starts;
- ``<pad>`` is new, a zero row (padding is masked and never read).

So the model has one token more than Marian's. Marian never predicts ``<pad>`` (transformers' Marian
conversion sets ``bad_words_ids=[[pad]]`` for ``generate()``; CTranslate2's converter drops the row and
starts the decoder from a zero embedding), and it must not here: an OPUS-MT ``<pad>`` row is zero, so
its logit is its bias, 0, which can outrank every real token. Both ``<pad>`` and ``<s>`` therefore get
the output bias ``SUPPRESSED_LOGIT``, so search, training and export need no special case, and the
model's distribution is Marian's without ``<pad>``, CTranslate2's.

Tokenization is ``MarianTokenizer``'s: ``source.spm`` and ``target.spm`` cut text into pieces that
``vocab.json`` maps to ids, which becomes a split ``distill.vocab.Vocab``.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from wdserve.artifacts import CHECKPOINT
from wdserve.distill.checkpoint import atomic_save_text, save_checkpoint
from wdserve.distill.model import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    UNK_ID,
    ModelConfig,
    Transformer,
    sinusoidal_table,
)
from wdserve.distill.vocab import Vocab
from wdserve.errors import WdserveError

if TYPE_CHECKING:
    from transformers import MarianMTModel, MarianTokenizer

PRETRAINED_CARD = "pretrained.json"

# The output bias of tokens Marian never predicts: exp(-1e4) is exactly 0 in float32 and float16, while
# the logit stays finite (0 * -inf would turn a KD loss into NaN) and representable in float16 exports.
SUPPRESSED_LOGIT = -1e4

HF_ACTIVATIONS = {"swish": "silu", "silu": "silu", "relu": "relu", "gelu": "gelu"}  # transformers' -> ours

# transformers' names inside one layer -> wdserve's (distill.model's EncoderLayer / DecoderLayer)
_LAYER_RENAMES = {
    "self_attn.": "self_attn.",
    "self_attn_layer_norm.": "self_attn_block.norm.",
    "encoder_attn.": "cross_attn.",
    "encoder_attn_layer_norm.": "cross_attn_block.norm.",
    "fc1.": "ffn.fc1.",
    "fc2.": "ffn.fc2.",
    "final_layer_norm.": "ffn_block.norm.",
}
_LAYER_NAME = re.compile(r"^model\.(encoder|decoder)\.layers\.(\d+)\.(.+)$")
# transformers' tensors outside the layers -> wdserve's vocabulary tables; None: handled on its own
# (positions are computed and compared, the bias gets suppressed entries, model.shared is one of the others)
_TABLES = {
    "model.encoder.embed_tokens.weight": "encoder.embedding.tokens.weight",
    "model.decoder.embed_tokens.weight": "decoder.embedding.tokens.weight",
    "lm_head.weight": "decoder.output_proj.weight",
    "model.shared.weight": None,
    "model.encoder.embed_positions.weight": None,
    "model.decoder.embed_positions.weight": None,
    "final_logits_bias": None,
}


class MarianImportError(WdserveError, ValueError):
    """A source that cannot be loaded or converted; the message says which and what to do."""


def import_marian(source: str | Path, out_dir: Path, *, local_files_only: bool = False) -> Path:
    """Converts ``source`` (a Hugging Face model id or a local directory) and returns the checkpoint path.

    With ``local_files_only`` (or ``HF_HUB_OFFLINE=1``) nothing is downloaded: a model id must already
    be in the Hugging Face cache.
    """
    model, tokenizer = load_pretrained(source, local_files_only=local_files_only)
    transformer, vocab = from_marian(model, tokenizer)
    card = {
        "format": "marian",
        "source": str(source),
        "commit": getattr(model.config, "_commit_hash", None),
        "transformers_version": _transformers_version(),
        "marian_vocab_size": model.config.vocab_size,
    }
    meta = {"name": "teacher", "method": "teacher", "source_lang": tokenizer.source_lang,
            "target_lang": tokenizer.target_lang, "pretrained": card}
    out_dir = Path(out_dir)
    path = out_dir / CHECKPOINT
    save_checkpoint(path, transformer, vocab, meta=meta)
    atomic_save_text(json.dumps(card, indent=2) + "\n", out_dir / PRETRAINED_CARD)
    return path


def load_pretrained(
    source: str | Path, *, local_files_only: bool = False
) -> tuple[MarianMTModel, MarianTokenizer]:
    """transformers' ``MarianMTModel`` and ``MarianTokenizer`` of ``source``, or a ``MarianImportError``."""
    try:
        import transformers
    except ImportError as err:
        raise MarianImportError(
            "importing a Hugging Face model needs the transformers package: pip install 'wdserve[hf]'"
        ) from err
    name = str(source)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise MarianImportError(f"{path} is a file; give the directory holding a saved MarianMTModel "
                                    "(config.json, weights) and its MarianTokenizer files")
        name = str(path)
    elif name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise MarianImportError(f"no such directory: {name} (nor is it a Hugging Face model id such as "
                                "Helsinki-NLP/opus-mt-de-en)")

    def load(loader):
        try:
            return loader.from_pretrained(name, local_files_only=local_files_only)
        except (OSError, ValueError) as err:  # missing files, offline mode, no network, no config.json
            raise MarianImportError(_load_failure(name, path.exists(), local_files_only, err)) from None

    config = load(transformers.AutoConfig)
    if config.model_type != "marian":
        raise MarianImportError(f"{name} is a {config.model_type!r} model; only Marian models "
                                "(MarianMTModel, e.g. Helsinki-NLP/opus-mt-*) can be imported")
    with warnings.catch_warnings():  # MarianTokenizer asks for sacremoses, which it does not use here
        warnings.filterwarnings("ignore", message=".*sacremoses.*")
        tokenizer = load(transformers.MarianTokenizer)
    model = load(transformers.MarianMTModel)
    return model.eval(), tokenizer


def _load_failure(name: str, is_dir: bool, local_files_only: bool, err: Exception) -> str:
    if is_dir:
        return (f"{name} does not hold a complete MarianMTModel with its MarianTokenizer (config.json, "
                f"model weights, source.spm, target.spm, vocab.json): {err}")
    from huggingface_hub import is_offline_mode

    if local_files_only or is_offline_mode():
        return (f"{name} is not in the Hugging Face cache and downloads are off (offline mode): run once "
                "with network access to cache it, or give a local directory holding a saved MarianMTModel "
                "and its MarianTokenizer files")
    return (f"cannot load {name} from the Hugging Face Hub: {err} Give a model id such as "
            "Helsinki-NLP/opus-mt-de-en, or a local directory holding a saved MarianMTModel and its "
            "MarianTokenizer files.")


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


# ---------------------------------------------------------------------------------------------------
# Conversion


def from_marian(model: MarianMTModel, tokenizer: MarianTokenizer) -> tuple[Transformer, Vocab]:
    """The wdserve model (in eval mode) and vocabulary equivalent to ``model`` and ``tokenizer``."""
    config = model_config(model)
    tokens, rows = token_order(model, tokenizer)
    vocab = Vocab.split(tokens, tokenizer.spm_source.serialized_model_proto(),
                        tokenizer.spm_target.serialized_model_proto())
    _check_positions(model, config)
    wanted = _state_dict(model, rows)
    transformer = Transformer(config)
    _check_shapes(transformer.state_dict(), wanted)
    transformer.load_state_dict(wanted)
    # A table wdserve ties (one Parameter) is loaded once per name: they must all have been equal.
    state = transformer.state_dict()
    differ = [key for key, tensor in wanted.items() if not torch.equal(state[key], tensor)]
    if differ:
        raise MarianImportError(f"tensors that the config ties differ in the Marian weights: {differ}")
    return transformer.eval(), vocab


def model_config(model: MarianMTModel) -> ModelConfig:
    """The ``ModelConfig`` of a Marian model, refusing what ``distill.model`` cannot represent."""
    hf = model.config
    if hf.activation_function not in HF_ACTIVATIONS:
        raise MarianImportError(f"activation_function {hf.activation_function!r} is not supported; "
                                f"expected one of {sorted(HF_ACTIVATIONS)}")
    if hf.decoder_vocab_size != hf.vocab_size:
        raise MarianImportError(f"the decoder has its own vocabulary ({hf.decoder_vocab_size} tokens, the "
                                f"encoder {hf.vocab_size}); only one shared vocabulary is supported")
    if hf.decoder_start_token_id != hf.pad_token_id:
        raise MarianImportError(f"decoder_start_token_id {hf.decoder_start_token_id} is not the pad id "
                                f"{hf.pad_token_id}, which Marian's decoder starts from")
    norm = model.model.encoder.layers[0].self_attn_layer_norm if hf.encoder_layers else None
    try:
        return ModelConfig(
            vocab_size=hf.vocab_size + 1,  # wdserve's <pad> is new (module docstring)
            enc_layers=hf.encoder_layers, enc_dim=hf.d_model, enc_heads=hf.encoder_attention_heads,
            enc_ffn=hf.encoder_ffn_dim,
            dec_layers=hf.decoder_layers, dec_dim=hf.d_model, dec_heads=hf.decoder_attention_heads,
            dec_ffn=hf.decoder_ffn_dim,
            pre_norm=False,
            activation=HF_ACTIVATIONS[hf.activation_function],
            share_embeddings=bool(hf.share_encoder_decoder_embeddings),
            tie_output=bool(hf.tie_word_embeddings),
            dropout=hf.dropout, attention_dropout=hf.attention_dropout,
            activation_dropout=hf.activation_dropout,
            max_positions=hf.max_position_embeddings,
            layer_norm_eps=norm.eps if norm is not None else 1e-5,
            position_encoding="marian",
            scale_embeddings=bool(hf.scale_embedding),
            output_bias=True,
        )
    except ValueError as err:
        raise MarianImportError(f"this Marian model cannot be represented: {err}") from err


def token_order(model: MarianMTModel, tokenizer: MarianTokenizer) -> tuple[list[str], list[int | None]]:
    """wdserve's tokens and, for each, its Marian id (``None`` for the new ``<pad>``)."""
    if tokenizer.separate_vocabs:
        raise MarianImportError("the tokenizer has separate source and target vocabularies "
                                "(target_vocab.json); only one shared vocabulary is supported")
    by_id = {marian_id: token for token, marian_id in tokenizer.get_vocab().items()}
    size = model.config.vocab_size
    if sorted(by_id) != list(range(size)):
        raise MarianImportError(f"vocab.json must number its tokens 0..{size - 1}, one each, as the model "
                                f"has {size} embedding rows; it has {len(by_id)} ids from {min(by_id)} "
                                f"to {max(by_id)}")
    special = {UNK_ID: tokenizer.unk_token_id, BOS_ID: model.config.decoder_start_token_id,
               EOS_ID: tokenizer.eos_token_id}
    if model.config.eos_token_id not in (None, tokenizer.eos_token_id):
        raise MarianImportError(f"the model's eos_token_id {model.config.eos_token_id} is not the "
                                f"tokenizer's </s> id {tokenizer.eos_token_id}")
    others = [marian_id for marian_id in range(size) if marian_id not in special.values()]
    clashes = sorted({by_id[i] for i in others} & set(SPECIAL_TOKENS))
    if clashes:
        raise MarianImportError(f"vocab.json has ordinary tokens named like wdserve's special tokens: "
                                f"{clashes}")
    rows: list[int | None] = [special.get(wd_id) for wd_id in range(len(SPECIAL_TOKENS))] + others
    tokens = list(SPECIAL_TOKENS) + [by_id[i] for i in others]
    return tokens, rows


def _check_shapes(expected: dict[str, torch.Tensor], wanted: dict[str, torch.Tensor]) -> None:
    """Every tensor of the model set, each with the shape the config implies; all problems in one message."""
    problems = []
    missing = sorted(set(expected) - set(wanted))
    if missing:
        problems.append(f"{len(missing)} tensors have no Marian counterpart, e.g. {missing[:3]}")
    for key, tensor in sorted(wanted.items()):
        if key not in expected:
            problems.append(f"{key} does not exist in the model")
        elif tuple(tensor.shape) != tuple(expected[key].shape):
            problems.append(f"{key} is {tuple(tensor.shape)} in the Marian weights but "
                            f"{tuple(expected[key].shape)} in the model built from its config")
    if problems:
        raise MarianImportError("the Marian weights do not fit the model built from its config: "
                                + "; ".join(problems))


def _check_positions(model: MarianMTModel, config: ModelConfig) -> None:
    """Positions are computed, not copied: the formula must reproduce transformers' tables."""
    ours = sinusoidal_table(config.max_positions, config.enc_dim, config.position_encoding)
    for side in ("encoder", "decoder"):
        theirs = getattr(model.model, side).embed_positions.weight.detach().float().cpu()
        if theirs.shape != ours.shape or not torch.allclose(theirs, ours, atol=1e-5, rtol=0):
            raise MarianImportError(f"the {side}'s sinusoidal positions differ from Marian's formula "
                                    f"(10000 ** (-2i / d_model), sin then cos); this transformers version "
                                    f"({_transformers_version()}) computes them otherwise")


def _state_dict(model: MarianMTModel, rows: list[int | None]) -> dict[str, torch.Tensor]:
    """wdserve's state dict from transformers', every name mapped explicitly, vocabulary rows reordered."""
    theirs = {key: tensor.detach().float().cpu() for key, tensor in model.state_dict().items()}
    wanted: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in theirs.items():
        match = _LAYER_NAME.match(key)
        prefix = match and next((p for p in _LAYER_RENAMES if match.group(3).startswith(p)), None)
        if prefix:
            side, index, rest = match.groups()
            wanted[f"{side}.layers.{index}.{_LAYER_RENAMES[prefix]}{rest[len(prefix):]}"] = tensor
        elif key not in _TABLES:
            unknown.append(key)
    if unknown:
        raise MarianImportError(f"Marian tensors without a wdserve counterpart: {unknown}")

    for theirs_key, ours_key in _TABLES.items():
        if ours_key is not None:
            wanted[ours_key] = _reorder(theirs[theirs_key], rows)
    bias = _reorder(theirs["final_logits_bias"].reshape(-1, 1), rows).reshape(-1)  # (1, V) -> (V + 1,)
    bias[[PAD_ID, BOS_ID]] = SUPPRESSED_LOGIT
    wanted["decoder.output_proj.bias"] = bias
    return wanted


def _reorder(table: torch.Tensor, rows: list[int | None]) -> torch.Tensor:
    """Row i of the result is Marian's row ``rows[i]``, or zeros where that is ``None``."""
    out = table.new_zeros((len(rows), table.size(1)))
    present = [i for i, row in enumerate(rows) if row is not None]
    out[present] = table[[rows[i] for i in present]]
    return out
