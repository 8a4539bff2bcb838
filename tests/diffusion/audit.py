"""Dispatch-level audits for GPU-shaped bugs on the CPU: every aten op the code runs passes through these modes."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class OpAudit(TorchDispatchMode):
    """Runs every op and hands (op, its tensors: inputs then outputs) to `check`, which returns a finding or None."""

    def __init__(self, check):
        super().__init__()
        self.check, self.found = check, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [a for a in tree_leaves((args, kwargs, out)) if isinstance(a, torch.Tensor)]
        finding = self.check(func, tensors)
        if finding is not None:
            self.found.append(finding)
        return out


def float64_on_batch(batch: int) -> OpAudit:
    """Finds ops that read or write a float64 tensor whose first dimension is the batch."""
    return OpAudit(lambda func, tensors: str(func) if any(
        t.dtype == torch.float64 and t.ndim and t.shape[0] == batch for t in tensors) else None)


def attention_strides() -> OpAudit:
    """Records (op, strides of q, k, v) for every scaled-dot-product-attention kernel called."""
    return OpAudit(lambda func, tensors: (str(func), [t.is_contiguous() for t in tensors[:3]])
                   if "scaled_dot_product" in str(func) else None)
