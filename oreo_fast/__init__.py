"""oreo_fast: fast, faithful OREO (Offline REasoning Optimization) training.

Public losses: ``oreo_loss`` (from logits) and ``oreo_loss_fused_linear`` (from hidden states
and LM-head weights, logits never materialised). Per-token ops live in ``oreo_fast.ops``, the
plain PyTorch specification in ``oreo_fast.ops.reference``.
"""
from oreo_fast.ops.loss import oreo_loss, oreo_loss_fused_linear, state_mask_for_level
from oreo_fast.ops.reference import OreoLossOutput

__version__ = "0.1.0"
__all__ = ["oreo_loss", "oreo_loss_fused_linear", "state_mask_for_level", "OreoLossOutput"]
