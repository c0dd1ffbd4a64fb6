"""Weight distillation (Lin et al., ACL 2021): a parameter generator maps teacher weights to student weights.

Layers. A side (encoder or decoder) with ``L_t`` teacher layers and ``L_s`` student layers needs
``k = L_t / L_s`` to be a whole number; student layer ``i`` (0-based) reads teacher layers
``[k*i, k*(i+1))``.

Matrices (q, k, v, attention output, cross-attention, both FFN matrices). From the stack of the k
teacher matrices ``T_1..T_k`` (torch layout ``(out, in)``)::

    W' = sum_l c_l * P_out^T T_l P_in        c = Lambda w
    W_s = A * tanh(W') + B                    (A, B element-wise, the student's shape)

``P_out`` is ``(teacher_out, student_out)`` and ``P_in`` ``(teacher_in, student_in)``, so ``W'`` has the
student's ``(out, in)`` shape. Init as in the authors' code: ``P``, ``Lambda`` Xavier-normal, ``w = 1/k``,
``A = 1``, ``B = 0``. Two choices of ours, both only about where the formula degenerates:

- a projection is used only on an axis whose widths differ (a square ``P`` would only scramble a basis
  the student already shares with the teacher); the embedding rule below says the same (with
  ``projections="shared"``, the default);
- with ``projections="shared"`` (the default) there is one ``P`` per width *space*, not per tensor
  (``width_space``): every tensor that reads or
  writes a side's residual stream (embeddings, q/k/v/out, FFN in/out, LayerNorms, output projection)
  maps that axis with the same ``P``, and both FFN matrices share the FFN one. With a private random
  ``P`` per tensor, q and k land in unrelated bases and each layer reads the stream in a basis other
  than the one the previous layer wrote it in, so the teacher's function is scrambled at the start:
  on the tiny config such a student learned a target-side language model that ignored the source
  (test BLEU 1.2 against 27.6 with shared spaces, same steps). ``projections="per-tensor"`` is the
  authors' form: a private Xavier-normal ``P`` per tensor and axis where the widths differ, biases
  included, and on every axis of a decoder layer's tensors, square where the widths agree (their
  ``WDV52Linear``/``WDV52LayerNorm``), while encoder layers of the teacher's width get none
  (``WDV29Linear``: ``A * tanh(W_t) + B``). A square ``P`` on the encoder too scrambles it: on the
  tiny config, test BLEU 0.33, 0.64, 1.11 (seeds 1-3, 100 + 300 steps) and 0.96 (seed 1, 300 + 300);
- with ``k = 1`` the sum has one term and ``c`` is dropped (the projections absorb a scalar).

So a tensor whose shape equals the teacher's with ``k = 1`` (an encoder kept at the teacher's size) is
``W_s = A * tanh(W_t) + B``: with ``A = 1, B = 0`` the student starts from ``tanh(W_t)``, not ``W_t``.
That is the authors' choice and is kept deliberately (phase 1 learns ``A`` and ``B``).
``init="teacher"`` instead starts such a tensor (one teacher tensor, no projection) at ``B = W_t -
tanh(W_t)``, so ``W_s = W_t`` exactly; every other tensor starts as above.

Biases and LayerNorm gamma/beta take the same form without ``P_in``:
``b_s = A * tanh(sum_l c_l P_out^T b_l) + B``.

Embeddings: ``E_s[x] = A[x] * tanh(E_t[x] P) + B[x]`` (``P`` omitted where widths agree). An untied
student output projection is generated the same way from the teacher's output projection ``E_out``
(the teacher's decoder table when the teacher ties them). Tied and shared tables are generated once:
the generator follows the student's ``share_embeddings`` / ``tie_output``.

The output bias (``output_bias``: an imported Marian teacher's ``final_logits_bias``) is copied from
the teacher, not generated, in every mode (``is_copied``). It is indexed by tokens alone, so there is
no width for ``P`` to map and the formula would reduce to ``A * tanh(b_t) + B``: with ``A = 1, B = 0``
every entry would be squashed into (-1, 1), and the teacher's ``SUPPRESSED_LOGIT`` (-1e4) on ``<pad>``
and ``<s>`` (``distill.marian``) would become -1, among ordinary logits: on the tests' tiny imported
teacher a folded stu1 then puts 0.4-0.8% of every step's probability on them (3 seeds; the teacher
and the copying student exactly 0), and nothing but phase 1 learning ``A`` and ``B`` up to 1e4 would
take it back. (The squeezing modes would also hold a V x V identity map for it.) There is nothing to
compress in it either: teacher and student share the vocabulary. Copying rather than re-applying the
suppressed entries after ``fold()``: phase 1's forward pass and the live student it evaluates already
have the teacher's bias, so phase 1 never trains or selects a student that gives ``<pad>`` any
probability. The copy is frozen in phase 1 (only the generator trains) and fine-tuned in phase 2 with
every other folded weight.

Training. Phase 1 trains only the generator (``P``, ``Lambda``, ``w``, ``A``, ``B``) through the
student's forward pass: ``torch.func.functional_call`` runs a student ``Transformer`` skeleton with the
generated tensors. Teacher tensors are non-persistent buffers (never trained, never saved in resume
checkpoints). ``fold()`` then evaluates the generator once into an ordinary ``Transformer`` that phase 2
fine-tunes and export converts.

The same machinery serves Weight Squeezing (``mode="ws"``, ``"gated-ws"``; see ``distill.ws``).
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.func import functional_call

from wdserve.distill.losses import unwrap
from wdserve.distill.model import ModelConfig, Transformer

MODES = ("wd", "ws", "gated-ws")
PROJECTIONS = ("shared", "per-tensor")  # wd: one P per width space, or a private P per tensor and axis
INITS = ("tanh", "teacher")  # wd: A = 1, B = 0; or B = T - tanh(T) where a tensor copies one teacher tensor

_LAYER_NAME = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.(.+)$")


def layer_groups(teacher_layers: int, student_layers: int, side: str) -> list[list[int]]:
    """Teacher layers (0-based) read by each student layer: ``[k*i, k*(i+1))`` with ``k = L_t / L_s``."""
    if student_layers < 1 or teacher_layers % student_layers:
        divisors = [d for d in range(1, teacher_layers + 1) if teacher_layers % d == 0]
        raise ValueError(
            f"the teacher's {side} has {teacher_layers} layers and the student's {student_layers}: "
            f"weight distillation maps k = teacher/student teacher layers onto each student layer, so the "
            f"teacher's layer count must be a multiple of the student's; use {side} layers in {divisors}"
        )
    k = teacher_layers // student_layers
    return [list(range(k * i, k * (i + 1))) for i in range(student_layers)]


def is_table(name: str) -> bool:
    """Vocabulary-sized tensors: rows are tokens and are never mixed, only their width is mapped."""
    return name.endswith("embedding.tokens.weight") or name == "decoder.output_proj.weight"


def is_copied(name: str) -> bool:
    """Student tensors taken from the teacher as they are, not generated: the output bias (module doc)."""
    return name == "decoder.output_proj.bias"


def width_space(name: str, axis: int) -> str:
    """The width an axis of student parameter ``name`` lives in: a side's residual stream or its FFN.

    Attention projections read and write the residual width (their inner width equals it);
    cross-attention keys and values read the encoder's.
    """
    side = name.split(".", 1)[0]
    if (".ffn.fc1." in name and axis == 0) or (".ffn.fc2." in name and axis == 1):
        return f"{side}.ffn"
    if axis == 1 and (".cross_attn.k_proj." in name or ".cross_attn.v_proj." in name):
        return "encoder.model"
    return f"{side}.model"


def teacher_sources(name: str, groups: dict[str, list[list[int]]]) -> list[str]:
    """Teacher parameter names whose stack generates student parameter ``name``."""
    match = _LAYER_NAME.match(name)
    if match is None:  # embeddings, output projection, final norms: one teacher tensor of the same name
        return [name]
    side, index, rest = match.group(1), int(match.group(2)), match.group(3)
    return [f"{side}.layers.{j}.{rest}" for j in groups[side][index]]


class TensorGenerator(nn.Module):
    """Generates one student tensor from a stack of teacher tensors ``(k, *teacher_shape)``.

    ``mode="wd"``: ``A * tanh(sum_l c_l P_out^T T_l P_in) + B`` (module docstring). ``shared``: the
    width spaces' ``P`` for the axes whose widths differ; ``square``: a private ``P`` on every axis.
    ``mode="ws"``: ``P_out^T T P_in`` (= ``L W_t R``), k must be 1.
    ``mode="gated-ws"``: ``sigmoid(G) * W_own + (1 - sigmoid(G)) * P_out^T T P_in``.
    """

    def __init__(
        self,
        teacher: torch.Tensor,
        student_shape: tuple[int, ...],
        mode: str = "wd",
        table: bool = False,
        own: torch.Tensor | None = None,
        shared: dict[int, nn.Parameter] | None = None,
        square: bool = False,
        init: str = "tanh",
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown generator mode {mode!r}; expected one of {MODES}")
        if init not in INITS:
            raise ValueError(f"unknown generator init {init!r}; expected one of {INITS}")
        k, teacher_shape = teacher.size(0), tuple(teacher.shape[1:])
        if len(teacher_shape) != len(student_shape):
            raise ValueError(f"teacher {teacher_shape} and student {student_shape} tensors differ in rank")
        if mode != "wd" and k != 1:
            raise ValueError(f"weight squeezing maps one teacher tensor per student tensor, got {k}")
        self.mode = mode
        self.register_buffer("teacher", teacher.detach().clone(), persistent=False)  # frozen, (k, *t_shape)

        # Rows of a table are tokens: only the width (axis 1) is mapped.
        axes = [1] if table else list(range(len(student_shape)))
        self.proj = nn.ParameterDict()
        for axis in axes:
            t_dim, s_dim = teacher_shape[axis], student_shape[axis]
            if t_dim != s_dim and shared is not None and axis in shared:
                self.proj[str(axis)] = shared[axis]  # the same Parameter object as its width space's
            elif t_dim != s_dim or square:
                self.proj[str(axis)] = nn.Parameter(nn.init.xavier_normal_(torch.empty(t_dim, s_dim)))
            elif mode != "wd":  # squeezing has no A, B: an identity map keeps the tensor trainable
                self.proj[str(axis)] = nn.Parameter(torch.eye(t_dim))
        if mode == "wd" and k > 1:
            self.mix = nn.Parameter(nn.init.xavier_normal_(torch.empty(k, k)))  # Lambda
            self.w = nn.Parameter(torch.full((k,), 1.0 / k))
        else:
            self.mix = self.w = None
        if mode == "wd":
            self.scale = nn.Parameter(torch.ones(student_shape))  # A
            self.shift = nn.Parameter(torch.zeros(student_shape))  # B
            if init == "teacher" and self.copies_teacher:
                with torch.no_grad():  # A * tanh(T) + B = T: the student starts as the teacher's tensor
                    self.shift.copy_(self.teacher[0] - torch.tanh(self.teacher[0]))
        if mode == "gated-ws":
            if own is None or tuple(own.shape) != tuple(student_shape):
                raise ValueError("gated weight squeezing needs the student's own initial tensor")
            self.own = nn.Parameter(own.detach().clone())
            self.gate = nn.Parameter(torch.zeros(student_shape))  # G: sigmoid(0) = 0.5 mixes evenly

    @property
    def copies_teacher(self) -> bool:
        """One teacher tensor and nothing to map: ``W' = T`` exactly."""
        return self.mix is None and self.teacher.size(0) == 1 and len(self.proj) == 0

    def mapped(self) -> torch.Tensor:
        """``sum_l c_l P_out^T T_l P_in`` (or the single teacher tensor mapped)."""
        if self.mix is not None:
            c = self.mix @ self.w  # (k,)
            x = torch.tensordot(c, self.teacher, dims=1)  # (*t_shape)
        else:
            x = self.teacher[0]
        for axis, p in self.proj.items():
            # Contract the teacher width on `axis` with P (t_dim, s_dim); put the student width back in place.
            x = torch.movedim(torch.tensordot(x, p, dims=([int(axis)], [0])), -1, int(axis))
        return x

    def forward(self) -> torch.Tensor:
        x = self.mapped()
        if self.mode == "wd":
            return self.scale * torch.tanh(x) + self.shift
        if self.mode == "ws":
            return x
        gate = torch.sigmoid(self.gate)
        return gate * self.own + (1 - gate) * x


class WeightGenerator(nn.Module):
    """A student ``Transformer`` whose every parameter is generated from a frozen teacher.

    ``forward(src, tgt_in)`` is the student's forward pass with generated weights; ``fold()`` returns
    the plain student. ``ws_layer`` picks, for squeezing modes, which teacher layer of each group of k
    feeds a student layer (default ``-1``: the last, whose output the next group reads).

    ``self.student`` is kept equal to ``fold()``: whenever it is used on its own (its encoder or decoder
    called outside the generator's forward, or its state dict read) and the generator's parameters
    changed since the last time, the generated weights are copied into it. So it is what
    ``distill.train.train`` evaluates and saves (``student_of=live_student``), while only the
    generator trains.
    """

    def __init__(
        self, teacher: Transformer, student_cfg: ModelConfig, mode: str = "wd", ws_layer: int = -1,
        projections: str = "shared", init: str = "tanh", own: Transformer | None = None,
    ) -> None:
        super().__init__()
        tcfg = teacher.config
        if mode not in MODES:
            raise ValueError(f"unknown generator mode {mode!r}; expected one of {MODES}")
        if projections not in PROJECTIONS:
            raise ValueError(f"unknown projections {projections!r}; expected one of {PROJECTIONS}")
        if own is not None and own.config != student_cfg:
            raise ValueError("the student whose weights start W_own must have the student's architecture")
        if student_cfg.vocab_size != tcfg.vocab_size:
            raise ValueError(
                f"student vocab_size {student_cfg.vocab_size} differs from the teacher's {tcfg.vocab_size}; "
                "a generated student shares the teacher's vocabulary"
            )
        if student_cfg.pre_norm != tcfg.pre_norm:
            raise ValueError("student and teacher must agree on pre_norm (their LayerNorms map one to one)")
        if student_cfg.output_bias != tcfg.output_bias:
            raise ValueError("student and teacher must agree on output_bias (a student copies the teacher's "
                             "output bias, which an imported teacher needs to never emit <pad> and <s>)")
        self.mode = mode
        self.projections = projections
        self.student_config = student_cfg
        groups = {
            "encoder": layer_groups(tcfg.enc_layers, student_cfg.enc_layers, "encoder"),
            "decoder": layer_groups(tcfg.dec_layers, student_cfg.dec_layers, "decoder"),
        }
        # The skeleton supplies modules, buffers and train/eval mode, and holds the copied tensors; its
        # other parameters are never used.
        self.student = Transformer(student_cfg)
        self.student.requires_grad_(False)
        teacher_params = dict(teacher.named_parameters(remove_duplicate=False))
        own_params = dict(own.named_parameters()) if own is not None else {}
        self.names: list[str] = []  # the generated tensors
        self.generators = nn.ModuleDict()
        self.spaces = nn.ParameterDict()  # wd: one P per width space, shared by every tensor on it
        shared = mode == "wd" and projections == "shared"
        for name, param in self.student.named_parameters():  # distinct tensors: ties appear once
            if is_copied(name):
                with torch.no_grad():
                    param.copy_(teacher_params[name])  # functional_call reads it from the skeleton
                continue
            sources = teacher_sources(name, groups)
            if mode != "wd":
                sources = [sources[ws_layer]]
            stack = torch.stack([teacher_params[s].detach() for s in sources])
            self.generators[name.replace(".", "__")] = TensorGenerator(
                stack, tuple(param.shape), mode, table=is_table(name),
                own=own_params.get(name, param) if mode == "gated-ws" else None,
                shared=self._space_projections(name, stack, param) if shared else None,
                square=mode == "wd" and not shared and _LAYER_NAME.match(name) is not None
                and name.startswith("decoder."), init=init,
            )
            self.names.append(name)
        # Every rank builds the same frozen teacher copies: DistributedDataParallel need not broadcast them.
        self._ddp_params_and_buffers_to_ignore = [f"generators.{key}.teacher" for key in self.generators]
        self._generating = False
        self._synced_versions: tuple[int, ...] | None = None
        for part in (self.student.encoder, self.student.decoder):
            part.register_forward_pre_hook(lambda module, args: self.sync_student())
        self.student.register_state_dict_pre_hook(lambda module, prefix, keep_vars: self.sync_student())

    def _space_projections(
        self, name: str, stack: torch.Tensor, param: torch.Tensor
    ) -> dict[int, nn.Parameter]:
        """The shared projection of every axis of ``name`` whose teacher and student widths differ."""
        shared = {}
        for axis in [1] if is_table(name) else range(param.dim()):
            t_dim, s_dim = stack.shape[1 + axis], param.shape[axis]
            if t_dim == s_dim:
                continue
            key = width_space(name, axis).replace(".", "__")
            if key not in self.spaces:
                self.spaces[key] = nn.Parameter(nn.init.xavier_normal_(torch.empty(t_dim, s_dim)))
            if tuple(self.spaces[key].shape) != (t_dim, s_dim):
                raise ValueError(f"{name} axis {axis}: width space {key} maps "
                                 f"{tuple(self.spaces[key].shape)}, this tensor needs {(t_dim, s_dim)}")
            shared[axis] = self.spaces[key]
        return shared

    def generate(self) -> dict[str, torch.Tensor]:
        """Every generated student tensor (all but the copied ones), keyed by its ``Transformer`` name."""
        return {name: self.generators[name.replace(".", "__")]() for name in self.names}

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        self._generating = True
        try:
            return functional_call(self.student, self.generate(), (src, tgt_in))
        finally:
            self._generating = False

    @torch.no_grad()
    def sync_student(self) -> None:
        """Copies the generated weights into ``self.student`` if the generator changed since last time."""
        if self._generating:
            return
        # Optimizer steps and load_state_dict update parameters in place, which bumps their versions.
        versions = tuple(p._version for p in self.generators.parameters())
        if versions == self._synced_versions:
            return
        weights = self.generate()
        for name, param in self.student.named_parameters():
            if name in weights:
                param.copy_(weights[name])
        self._synced_versions = versions

    @torch.no_grad()
    def fold(self) -> Transformer:
        """Evaluates the generator once into an ordinary student (same device, training mode)."""
        weights = {**dict(self.student.named_parameters()), **self.generate()}  # copied, then generated
        device = next(iter(weights.values())).device
        model = Transformer(self.student_config).to(device)
        for name, param in model.named_parameters():  # same construction order as the skeleton
            param.copy_(weights[name])
        return model


def live_student(generator: WeightGenerator) -> Transformer:
    """``student_of`` for ``distill.train.train``: the student kept equal to the generator's output."""
    generator = unwrap(generator)
    generator.sync_student()
    return generator.student
