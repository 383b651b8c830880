"""DEQ-Transformer and DEQ-TrellisNet language models and their building blocks.

Both models take ``deq_layer``, a callable that builds the :class:`deq.DEQLayer`
around their equilibrium function (e.g. ``functools.partial(deq.DEQLayer,
solver="anderson", backward="implicit", max_iter=30)``), keep it as ``.deq`` and
never know which solver or backward pass it uses. ``model.deq.unroll_steps = L``
turns either into its explicit weight-tied twin (L layers, ordinary autograd).
"""

from .transformer import TRANSFORMER_PRESETS, DEQTransformerBlock, DEQTransformerLM
from .output import LMOutput
from .trellisnet import TRELLISNET_PRESETS, DEQTrellisNetLM, TrellisNetCell

__all__ = ["DEQTransformerBlock", "DEQTransformerLM", "DEQTrellisNetLM", "LMOutput", "TRANSFORMER_PRESETS",
           "TRELLISNET_PRESETS", "TrellisNetCell"]
