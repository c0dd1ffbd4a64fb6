"""Weight Squeezing and Gated Weight Squeezing (Chumachenko et al., 2020).

Weight Squeezing is the linear special case of weight distillation: each student tensor is one
teacher tensor squeezed by two learned maps, with no ``tanh`` and no element-wise ``A``, ``B``::

    W_s = L W_t R          (L = P_out^T: (student_out, teacher_out), R = P_in: (teacher_in, student_in))
    b_s = L b_t            (biases, LayerNorm gamma/beta)
    E_s = E_t R            (embedding tables and the output projection: rows are tokens)

Gated Weight Squeezing keeps trainable student weights ``W_own`` (initialised as a fresh student)
and learns, element by element, how much of the squeezed teacher to use::

    W = sigmoid(G) * W_own + (1 - sigmoid(G)) * (L W_t R)          G = 0 at start

Choices: student layer ``i`` of a side with ``k = L_t / L_s`` reads teacher layer ``k*(i+1) - 1``,
the last of its group (whose output is what the next group reads, so depth order is kept). ``L``
and ``R`` are Xavier-normal where the widths differ and start as identity where they agree (a square
random map would throw away a teacher tensor the student could copy as is).

Both run on ``distill.wd.WeightGenerator`` (modes ``"ws"`` and ``"gated-ws"``) and fold into a plain
student exactly as weight distillation does.
"""

from __future__ import annotations

from wdserve.distill.model import ModelConfig, Transformer
from wdserve.distill.wd import WeightGenerator


def squeezing_generator(
    teacher: Transformer, student_cfg: ModelConfig, gated: bool = False
) -> WeightGenerator:
    """A generator computing ``L W_t R`` (or its gated mix with the student's own weights)."""
    return WeightGenerator(teacher, student_cfg, mode="gated-ws" if gated else "ws", ws_layer=-1)
