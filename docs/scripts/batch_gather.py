"""How long gathering one training batch of uint8 digits takes on this CPU: advanced indexing
(`images[idx]`) against `index_select` (what lenet5's train_epoch uses), 2,000 calls each.

    python docs/scripts/batch_gather.py
"""

from __future__ import annotations

import time

import torch


def main() -> None:
    images = torch.randint(0, 256, (60_000, 28, 28), dtype=torch.uint8)
    print(f"{torch.get_num_threads()} threads")
    for batch in (32, 256):
        idx = torch.randperm(60_000)[:batch]
        for name, gather in (("images[idx]", lambda: images[idx]), ("index_select", lambda: images.index_select(0, idx))):
            for _ in range(100):
                gather()
            started = time.perf_counter()
            for _ in range(2000):
                gather()
            print(f"batch {batch:>3}: {name:<13} {(time.perf_counter() - started) / 2000 * 1e6:6.1f} us")


if __name__ == "__main__":
    main()
