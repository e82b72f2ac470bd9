import numpy as np
import pytest
from scipy import stats

from remlstop.qform import davies, qform_tail, saddlepoint, satterthwaite


def _two_level_tail(a: float, b: float, k: int, m: int, r: float) -> float:
    """Exact P(R >= r) when R = (a S1 + b S2)/(S1 + S2), S1 ~ chi2_k, S2 ~ chi2_{m-k}, a > b.

    R = b + (a - b) B with B ~ Beta(k/2, (m-k)/2): a closed form to check against.
    """
    return float(stats.beta.sf((r - b) / (a - b), k / 2, (m - k) / 2))


@pytest.mark.parametrize("r", [1.2, 1.5, 2.0, 2.6])
def test_davies_and_saddlepoint_match_a_closed_form(r):
    a, b, k, m = 3.0, 1.0, 10, 60
    mu = np.r_[np.full(k, a), np.full(m - k, b)]
    exact = _two_level_tail(a, b, k, m, r)
    p_davies, fault = davies(mu - r)
    assert fault == 0
    assert p_davies == pytest.approx(exact, rel=1e-5, abs=1e-9)
    assert saddlepoint(mu - r) == pytest.approx(exact, rel=0.1)


def test_tiny_p_values_fall_back_to_the_saddlepoint_with_relative_accuracy():
    a, b, k, m = 3.0, 1.0, 10, 200
    mu = np.r_[np.full(k, a), np.full(m - k, b)]
    r = 2.2
    exact = _two_level_tail(a, b, k, m, r)
    assert exact < 1e-12
    tail = qform_tail(mu - r)
    assert tail.method == "saddlepoint" and "accuracy" in tail.note
    assert tail.pvalue == pytest.approx(exact, rel=0.1)
    assert tail.pvalue > 0  # never a silent 0


def test_degenerate_signs_are_exact():
    assert qform_tail(np.array([-1.0, -2.0])).pvalue == 0.0
    assert qform_tail(np.array([1.0, 2.0]), q=-1.0).pvalue == 1.0
    assert qform_tail(np.array([-1.0, -2.0])).method == "exact"


def test_satterthwaite_matches_chi2_when_weights_are_equal():
    # M = I_m: kappa = 1/2, nu = m, U = chi2_m / 2 exactly.
    m = 30
    p = satterthwaite(float(m), float(m), 0.5 * 40.0)
    assert p == pytest.approx(stats.chi2.sf(40.0, m), rel=1e-12)


def test_bad_coefficients_raise():
    with pytest.raises(ValueError, match="finite"):
        qform_tail(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="non-empty"):
        qform_tail(np.array([]))


@pytest.mark.parametrize(
    "coeffs, q, exact",
    [
        ([1.0], 1.0, stats.chi2.sf(1.0, 1)),  # Davies cannot answer forms this small
        ([0.0, 0.0, 1.0], 3.84, stats.chi2.sf(3.84, 1)),
        ([2.0], 2.0, stats.chi2.sf(1.0, 1)),
        ([-1.0, -1.0, 2.0], 0.0, 1.0 - stats.f.cdf(1.0, 1, 2)),  # 2 X1 > X2 + X3: F(1, 2) > 1
    ],
)
def test_small_forms_get_the_exact_tail(coeffs, q, exact):
    tail = qform_tail(coeffs, q)
    assert tail.method in ("davies", "imhof")
    assert tail.pvalue == pytest.approx(exact, rel=1e-7)


def test_thresholds_beyond_the_distribution_are_answered_exactly_or_refused():
    assert qform_tail([1.0, 2.0], float("inf")).pvalue == 0.0
    assert qform_tail([1.0, -1.0], float("-inf")).pvalue == 1.0
    assert qform_tail([1.0, 2.0], 1e300).pvalue == 0.0  # Davies returned 1/2 here
    with pytest.raises(ValueError, match="q is NaN"):
        qform_tail([1.0, 2.0], float("nan"))
    with pytest.raises(TypeError, match="q must be a real number"):
        qform_tail([1.0, 2.0], "1")


def test_the_saddlepoint_answers_sure_cases_and_its_mean_limit():
    assert saddlepoint([1.0, 1.0], -1.0) == 1.0  # looped forever before
    assert saddlepoint([-1.0, -1.0], 1.0) == 0.0
    # At the mean the Lugannani-Rice limit 1/2 - κ3 / (6 √(2π) κ2^1.5), not the normal 1/2.
    assert saddlepoint([1.0], 1.0) == pytest.approx(stats.chi2.sf(1.0, 1), abs=0.01)
