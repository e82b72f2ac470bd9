"""remlstop: whether to train a network, and when to stop, from the training data alone.

Squared-error gradient flow through a fixed kernel is empirical-Bayes inference in a
random-effects model with training time as a variance component (arXiv 2605.27991). remlstop
tests whether that component is non-zero (train at all?) and estimates it by REML (when to stop).
"""

from .clock import GradientFlowClock, loss_matched_time
from .criteria import CRITERIA, Criteria, evaluate_criteria
from .decision import Decision
from .gcv import GCVFit, LOOFit, gcv_fit, loo_fit
from .ntk import empirical_ntk, ntk_trace, ntk_vector_product
from .options import StopperOptions
from .priors import PriorFit, fit_prior
from .reml import REMLFit, profile_loglik, reml_fit
from .spectrum import KernelSpectrum
from .stopper import REMLStopper
from .vctest import VarianceComponentTest, variance_component_test

__version__ = "0.1.0.dev0"

__all__ = [
    "CRITERIA",
    "Criteria",
    "Decision",
    "GCVFit",
    "GradientFlowClock",
    "KernelSpectrum",
    "LOOFit",
    "PriorFit",
    "REMLFit",
    "REMLStopper",
    "StopperOptions",
    "VarianceComponentTest",
    "empirical_ntk",
    "evaluate_criteria",
    "fit_prior",
    "gcv_fit",
    "loo_fit",
    "loss_matched_time",
    "ntk_trace",
    "ntk_vector_product",
    "profile_loglik",
    "reml_fit",
    "variance_component_test",
]
