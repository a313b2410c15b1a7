"""Candidate 2 of the robust recipe (README.md beside this file): low resolution on 40% of the
images, at 7-14 px. Run from the repository root with the candidate's options:

    python docs/results/stress/outliers/candidate2.py train --recipe robust --outliers 0.25 --outlier-weight 0.25
"""
import sys

from lenet5.data import augment

augment.ROBUST_SHARES["low_resolution"] = 0.4
augment.ROBUST_LOWRES_SIZES = (7, 8, 9, 10, 12, 14)
from lenet5.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
