"""How close the nearest wrong class comes, in lenet5-1998's RBF penalties on the test set, after training.

Eq. 9 is y_correct + log(e^-j + sum over all classes of e^-y_i). Its second term pulls on a class's
penalty only while e^-y_i is not negligible next to e^-j: the correct class's once it is small,
a wrong class's when it comes within a few units. This measures both after training: the wrong
classes' part of the sum, and the net pull on the correct class's penalty, 1 - e^-y_c / S (1 for
the first term alone; j sets it once the wrong classes are far).

    lenet5 reproduce lecun1998 --threads 1 --out-dir OUT --name plain
    python docs/scripts/rbf_penalties.py OUT/plain/checkpoints/last.safetensors [--data-dir ../shared/mnist]
"""

from __future__ import annotations

import argparse

import torch

from lenet5.checkpoint import load_checkpoint
from lenet5.data.mnist import load_mnist
from lenet5.data.transforms import to_model_input


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data-dir", default="../shared/mnist")
    args = parser.parse_args()
    model = load_checkpoint(args.checkpoint).model.eval()
    test = load_mnist(args.data_dir).test
    with torch.no_grad():  # the penalties y_i, (N, 10)
        y = torch.cat([model(to_model_input(test.images[i:i + 2000])) for i in range(0, len(test), 2000)])
    rows = torch.arange(len(y))
    correct = y[rows, test.labels]
    wrong = y.clone()
    wrong[rows, test.labels] = float("inf")
    nearest = wrong.min(1).values
    q = torch.tensor([0.01, 0.1, 0.5, 0.9])
    j = float(model.j)
    rubbish = torch.exp(torch.tensor(-j))
    competitive = torch.exp(-wrong).sum(1)
    total = rubbish + competitive + torch.exp(-correct)
    share = competitive / total
    pull = 1 - torch.exp(-correct) / total
    print(f"{len(y)} test digits, j = {j:g}")
    print("the correct class's penalty, quantiles 1/10/50/90%:", [round(v, 2) for v in torch.quantile(correct, q).tolist()])
    print("the nearest wrong class's penalty, quantiles 1/10/50/90%:",
          [round(v, 2) for v in torch.quantile(nearest, q).tolist()])
    print(f"the wrong classes' share of the sum in the second term: median {share.median().item():.2e}, "
          f"max {share.max().item():.3f}")
    print("the net pull on the correct class's penalty (dE/dy_c), quantiles 1/10/50/90%:",
          [round(v, 3) for v in torch.quantile(pull, q).tolist()])
    for limit in (3, 10):
        print(f"digits whose nearest wrong penalty is below {limit}: {int((nearest < limit).sum())}")


if __name__ == "__main__":
    main()
