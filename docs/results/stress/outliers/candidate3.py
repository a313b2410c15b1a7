"""Candidate 3 of the robust recipe (README.md beside this file): low resolution on 30% of the
images, as the recipe, but at 7-14 px. Run from the repository root with the candidate's options:

    python docs/results/stress/outliers/candidate3.py train --recipe robust --outliers 0.25 --outlier-weight 0.1
"""
import sys

from lenet5.data import augment

augment.ROBUST_LOWRES_SIZES = (7, 8, 9, 10, 12, 14)
from lenet5.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
