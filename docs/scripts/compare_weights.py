"""Whether two safetensors files hold the same weights, bit for bit, and a digest of each.

    python docs/scripts/compare_weights.py A.safetensors B.safetensors
"""

import hashlib
import sys

import torch
from safetensors.torch import load_file


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of every tensor's bytes, in the order of their names."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(tensors[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
same = a.keys() == b.keys() and all(
    a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and bool((a[k] == b[k]).all()) for k in a)
print(f"{len(a)} tensors, {sum(v.numel() for v in a.values()):,} numbers; every tensor equal: {same}")
print(f"sha256 of the tensors (sorted by name): {digest(a)} / {digest(b)}")
