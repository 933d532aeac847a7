"""Attribution alignment: differentiable attributions, priors, distances, faithfulness metrics."""

from hfhooks.attribution.alignment import AttributionAlignment
from hfhooks.attribution.distances import DISTANCES, distance, normalise
from hfhooks.attribution.faithfulness import AOPC_KS, deletion_insertion, faithfulness
from hfhooks.attribution.methods import METHODS, attribute, compute_attribution, target_scores
from hfhooks.attribution.priors import (
    AlignmentContext,
    ColumnPrior,
    ContrastivePrior,
    FunctionPrior,
    HybridPrior,
    Prior,
    pool_words,
)

__all__ = [
    "AOPC_KS",
    "DISTANCES",
    "METHODS",
    "AlignmentContext",
    "AttributionAlignment",
    "ColumnPrior",
    "ContrastivePrior",
    "FunctionPrior",
    "HybridPrior",
    "Prior",
    "attribute",
    "compute_attribution",
    "deletion_insertion",
    "distance",
    "faithfulness",
    "normalise",
    "pool_words",
    "target_scores",
]
