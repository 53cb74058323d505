"""The OREO losses, bottom layer of oreo_fast above the Triton kernels.

- ``reference``: the readable specification (materialised float32/float64 maths);
- ``logits``: the per-token op (logp, ref_logp, kl) from [B, T, V] logits;
- ``fused_linear``: the same from hidden states and LM-head weights, logits chunked;
- ``grad_in_forward`` (+ ``chunk_plan``): the losses with the gradient computed in the forward,
  walking each sequence backwards (the default);
- ``loss``: the public ``oreo_loss`` / ``oreo_loss_fused_linear``;
- ``validation``: argument checks; ``dispatch``: the ``impl`` rule.

Everything a caller outside this package needs is imported here.
"""
from oreo_fast.ops.dispatch import IMPLS, resolve_impl
from oreo_fast.ops.fused_linear import (fused_linear_token_logprobs_kl,
                                        fused_linear_token_logprobs_kl_unchecked)
from oreo_fast.ops.logits import token_logprobs_kl, token_logprobs_kl_unchecked
from oreo_fast.ops.grad_in_forward import oreo_loss_fused_linear_gif, oreo_loss_gif
from oreo_fast.ops.loss import oreo_loss, oreo_loss_fused_linear, state_mask_for_level
from oreo_fast.ops.reference import (KL_ESTIMATORS, LEVELS, OreoLossOutput, bellman_losses,
                                     compute_dtype, masked_sequence_mean)

__all__ = [
    "IMPLS", "KL_ESTIMATORS", "LEVELS", "OreoLossOutput", "bellman_losses", "compute_dtype",
    "fused_linear_token_logprobs_kl", "fused_linear_token_logprobs_kl_unchecked",
    "masked_sequence_mean", "oreo_loss", "oreo_loss_fused_linear", "oreo_loss_fused_linear_gif",
    "oreo_loss_gif", "resolve_impl",
    "state_mask_for_level", "token_logprobs_kl", "token_logprobs_kl_unchecked",
]
