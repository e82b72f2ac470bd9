"""The large-N (Nystrom) spectrum (METHOD M10): exact where it should be, and wired through."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from remlstop import KernelSpectrum, REMLStopper
from remlstop.criteria import CRITERIA, evaluate_criteria
from remlstop.datasets import paper_mlp, paper_simple_function
from remlstop.ntk import empirical_ntk, ntk_trace
from remlstop.nystrom import choose_landmarks, nystrom_from_rows, nystrom_kernel, relative_shift
from remlstop.options import StopperOptions
from remlstop.vctest import variance_component_test

from .conftest import random_psd


def _low_rank_case(seed: int = 0, n: int = 200, rank: int = 20):
    rng = np.random.default_rng(seed)
    H = random_psd(n, rank, rng)
    H = (H + H.T) / 2
    u0 = rng.standard_normal(n) + H @ rng.standard_normal(n)
    return H, u0


def test_landmarks_spanning_a_low_rank_kernel_give_the_dense_spectrum_exactly():
    H, u0 = _low_rank_case()
    S = choose_landmarks(200, seed=1, landmarks=60)
    approx = nystrom_from_rows(H[S], S, float(np.trace(H)), u0).spectrum()
    dense = KernelSpectrum.from_kernel(H, u0)
    np.testing.assert_allclose(approx.eigenvalues[-20:], dense.eigenvalues[-20:], rtol=1e-9)
    np.testing.assert_allclose(np.abs(approx.z[-20:]), np.abs(dense.z[-20:]), rtol=1e-7)
    info = approx.approximation
    assert info.rank == 20 and info.tail_count == 180
    assert info.tail_eigenvalue == pytest.approx(0.0, abs=1e-12)
    assert info.resolved_trace == pytest.approx(1.0)
    # The unresolved cluster holds the residual outside the kernel's range, as the dense
    # spectrum's zero eigenvalues do: every criterion agrees.
    a, b = evaluate_criteria(approx), evaluate_criteria(dense)
    for name, fit in b.fits.items():
        assert a.fits[name].t == pytest.approx(fit.t, rel=1e-6), name


def test_the_nystrom_eigenvalues_never_exceed_the_dense_ones():
    rng = np.random.default_rng(2)
    H = random_psd(150, 150, rng)
    H = (H + H.T) / 2
    u0 = rng.standard_normal(150)
    S = choose_landmarks(150, seed=0, landmarks=40)
    approx = nystrom_from_rows(H[S], S, float(np.trace(H)), u0).spectrum()
    info = approx.approximation
    resolved = approx.eigenvalues[approx.eigenvalues > info.tail_eigenvalue * (1 + 1e-12)]
    dense = np.linalg.eigvalsh(H)[::-1][: resolved.size]
    # H - H_S is positive semi-definite, so the j-th eigenvalue of H_S is at most H's.
    assert np.all(np.sort(resolved)[::-1] <= dense * (1 + 1e-10))
    assert approx.trace == pytest.approx(np.trace(H), rel=1e-12)
    assert approx.residual_norm2 == pytest.approx(u0 @ u0, rel=1e-12)
    assert 0.0 < info.resolved_trace < 1.0 and 0.0 < info.tail_energy < 1.0


def test_covariates_compress_the_nystrom_kernel_as_the_dense_path_does():
    H, u0 = _low_rank_case(seed=3)
    Z = np.column_stack([np.ones(200), np.linspace(-1, 1, 200)])
    S = choose_landmarks(200, seed=2, landmarks=60)
    factor = nystrom_from_rows(H[S], S, float(np.trace(H)), u0, covariates=Z)
    Q = factor.covariate_basis
    approx = factor.spectrum(kernel_times=H @ Q)
    dense = KernelSpectrum.from_kernel(H, u0, covariates=Z)
    assert approx.dim == dense.dim == 198
    np.testing.assert_allclose(approx.eigenvalues[-20:], dense.eigenvalues[-20:], rtol=1e-8)
    assert variance_component_test(approx).pvalue == pytest.approx(
        variance_component_test(dense).pvalue, rel=1e-6
    )
    # Without kernel_times the same factorisation gives the uncompressed spectrum.
    plain = nystrom_from_rows(H[S], S, float(np.trace(H)), u0).spectrum()
    np.testing.assert_array_equal(factor.spectrum().eigenvalues, plain.eigenvalues)
    with pytest.raises(ValueError, match="kernel_times must be H Q of shape"):
        factor.spectrum(kernel_times=H @ Q[:, :1])
    with pytest.raises(ValueError, match="built without covariates"):
        nystrom_from_rows(H[S], S, float(np.trace(H)), u0).spectrum(kernel_times=H @ Q)


@pytest.mark.parametrize("K", [1, 2])
def test_a_nested_approximation_is_the_one_its_landmarks_would_build_alone(K):
    rng = np.random.default_rng(4)
    n = 90
    H = random_psd(n * K, n * K, rng)
    H = (H + H.T) / 2
    u0 = rng.standard_normal(n * K)
    Z = np.column_stack([np.ones(n * K), rng.standard_normal(n * K)])

    def kernel_rows(train_rows):
        return (train_rows[:, None] * K + np.arange(K)[None, :]).reshape(-1)

    chosen = choose_landmarks(n, seed=0, landmarks=30)
    trace = float(np.trace(H))
    rows = kernel_rows(chosen)
    factor = nystrom_from_rows(H[rows], rows, trace, u0, covariates=Z, landmarks=30)
    keep = choose_landmarks(30, seed=1, landmarks=14)
    keep2 = choose_landmarks(14, seed=2, landmarks=6)
    for nested, train_rows in (
        (factor.nested(keep), chosen[keep]),
        (factor.nested(keep).nested(keep2), chosen[keep][keep2]),
    ):
        S = kernel_rows(train_rows)
        alone = nystrom_from_rows(H[S], S, trace, u0, covariates=Z, landmarks=train_rows.size)
        assert nested.landmarks == train_rows.size
        np.testing.assert_array_equal(nested.landmark_rows, S)
        Q = alone.covariate_basis
        for a, b in (
            (nested.spectrum(), alone.spectrum()),
            (nested.spectrum(kernel_times=H @ Q), alone.spectrum(kernel_times=H @ Q)),
        ):
            np.testing.assert_allclose(a.eigenvalues, b.eigenvalues, rtol=1e-9, atol=1e-15)
            np.testing.assert_allclose(np.abs(a.z), np.abs(b.z), rtol=1e-7, atol=1e-12)
            assert a.approximation.rank == b.approximation.rank
            assert a.approximation.tail_energy == pytest.approx(b.approximation.tail_energy)
    with pytest.raises(ValueError, match="at least 3 distinct"):
        factor.nested(np.array([0, 1]))
    with pytest.raises(ValueError, match="index this approximation's 30 landmarks"):
        factor.nested(np.array([0, 1, 30]))


def test_relative_shift_names_the_infinite_cases():
    assert relative_shift(12.0, 10.0) == pytest.approx(0.2)
    assert relative_shift(math.inf, math.inf) == 0.0
    assert relative_shift(math.inf, 10.0) == math.inf
    assert relative_shift(10.0, math.inf) == -1.0
    assert relative_shift(1.0, 0.0) == math.inf


def test_the_decision_reports_the_stop_with_half_of_the_landmarks():
    stopper, model = _stopper(kernel="nystrom", landmarks=200, test_covariates="f0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        decision = stopper.start()
    a = decision.approximation
    assert a.check_landmarks == 100
    assert set(a.check_times) == set(CRITERIA)
    # The same numbers from the library's parts, put together by hand.
    x, y = stopper.data
    with torch.no_grad():
        f0 = model(x)
    u0 = (y - f0).double().reshape(-1).numpy()
    nested = nystrom_kernel(model, x, u0, landmarks=200, seed=0).nested(
        choose_landmarks(200, seed=0, landmarks=100)
    )
    fits = evaluate_criteria(nested.spectrum()).fits
    # The float32 kernel rows are summed in another order here: 1e-7 apart, measured.
    for name in CRITERIA:
        assert a.check_times[name] == pytest.approx(fits[name].t, rel=1e-5), name
    assert math.isfinite(a.check_pvalue) and 0 <= a.check_pvalue < 1
    line = decision.landmark_check()
    assert line is not None and "with 100 of the 200 landmarks the reml-linear stop moves" in line
    assert line in str(decision)
    dense, _ = _stopper(kernel="dense")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exact = dense.start()
    assert exact.landmark_check() is None and exact.landmark_check_passed is None


def test_a_stop_that_moves_beyond_its_interval_with_half_of_the_landmarks_is_warned_of():
    # Seeded: at n = 800 the paper's REML from 10 landmarks stops at 0.33 x its stop from 5,
    # outside its own 95% interval; from 30 landmarks the two agree to 7%, inside it.
    stopper, _ = _stopper(n=800, kernel="nystrom", landmarks=10, criterion="reml")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decision = stopper.start()
    assert any(
        w.category is RuntimeWarning and "has not settled in the landmarks" in str(w.message)
        for w in caught
    )
    assert decision.landmark_check_passed is False
    assert "outside its 95% interval" in decision.landmark_check()
    passing, _ = _stopper(n=800, kernel="nystrom", landmarks=30, criterion="reml")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.filterwarnings("error", message=".*has not settled")
        assert passing.start().landmark_check_passed is True


def test_the_landmark_check_runs_with_several_outputs_and_covariates_and_not_below_3():
    torch.manual_seed(0)
    x = torch.randn(120, 4)
    y = torch.column_stack([x[:, 0].sin(), x[:, 1] * x[:, 2], x[:, 3]]) + 0.1 * torch.randn(120, 3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        decision = REMLStopper(
            model,
            x,
            y,
            optimizer=opt,
            kernel="nystrom",
            landmarks=30,
            test_covariates="intercept",
        ).start()
    with pytest.warns(RuntimeWarning, match="landmark check: not run, half of the 5 landmarks"):
        few = REMLStopper(model, x, y, optimizer=opt, kernel="nystrom", landmarks=5).start()
    a = decision.approximation
    assert a.check_landmarks == 15 and set(a.check_times) == set(CRITERIA)
    assert all(t >= 0 for t in a.check_times.values()) and 0 <= a.check_pvalue <= 1
    assert decision.test.n_fixed == 3
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    # Half of 5 landmarks is too few for a factorisation: no check, said as such.
    assert few.approximation.check_landmarks == 0 and few.approximation.check_times == {}
    assert "use landmarks >= 6" in few.landmark_check() and few.landmark_check_passed is None
    assert few.landmark_check() in few.summary()
    assert math.isnan(few.approximation.check_shift("reml", 1.0))


def _assert_blocks_are_the_dense_kernels(factor, H, u0, Z=None):
    S = factor.landmark_rows
    C = H[S]
    np.testing.assert_allclose(factor.block, H[np.ix_(S, S)], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(factor.row_gram, C @ C.T, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(factor.residual_rows, C @ u0, rtol=1e-10, atol=1e-14)
    if Z is not None:
        Q = factor.covariate_basis
        np.testing.assert_allclose(Q @ (Q.T @ Z), Z, atol=1e-12)
        np.testing.assert_allclose(factor.covariate_rows, C @ Q, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("block_rows", [None, 7, 30])
def test_streamed_landmark_rows_give_the_dense_kernels_blocks_and_the_exact_trace(block_rows):
    x, _, _, _ = paper_simple_function(n=130, n_train=120, seed=0)
    model = paper_mlp(width=32, seed=0).double()
    x = x.double()
    u0 = np.random.default_rng(1).standard_normal(120)
    Z = np.column_stack([np.ones(120), x[:, 0].numpy()])
    factor = nystrom_kernel(model, x, u0, landmarks=30, covariates=Z, seed=4, block_rows=block_rows)
    H = empirical_ntk(model, x).numpy()
    # 7 rows per block: 18 blocks, the last one ragged, most holding some landmarks.
    _assert_blocks_are_the_dense_kernels(factor, H, u0, Z)
    assert factor.trace == pytest.approx(ntk_trace(model, x), rel=1e-10)
    assert factor.trace == pytest.approx(np.trace(H), rel=1e-10)
    assert factor.kernel_path == "layerwise"
    whole = nystrom_from_rows(H[factor.landmark_rows], factor.landmark_rows, np.trace(H), u0)
    np.testing.assert_allclose(
        factor.spectrum().eigenvalues, whole.spectrum().eigenvalues, rtol=1e-9, atol=1e-15
    )


@pytest.mark.parametrize("network", ["three_outputs", "generic"])
def test_landmark_rows_follow_the_row_major_order_on_both_backends(network):
    torch.manual_seed(0)
    x = torch.randn(40, 6, dtype=torch.float64)
    if network == "three_outputs":
        model = torch.nn.Sequential(
            torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)
        ).double()
    else:
        model = torch.nn.Sequential(
            torch.nn.Linear(6, 16), torch.nn.LayerNorm(16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
        ).double()
    H = empirical_ntk(model, x).numpy()
    K = H.shape[0] // 40
    u0 = np.random.default_rng(0).standard_normal(40 * K)
    factor = nystrom_kernel(model, x, u0, landmarks=10, seed=1, block_rows=16)
    assert factor.landmark_rows.size == 10 * K
    assert factor.kernel_path == ("layerwise" if network == "three_outputs" else "generic")
    _assert_blocks_are_the_dense_kernels(factor, H, u0)
    rows = factor.landmark_rows.reshape(10, K)
    assert np.array_equal(rows % K, np.tile(np.arange(K), (10, 1)))
    spectrum = factor.spectrum()
    assert spectrum.dim == 40 * K
    assert spectrum.trace == pytest.approx(np.trace(H), rel=1e-10)


def test_bad_factorisation_inputs_are_refused_with_the_reason():
    H, u0 = _low_rank_case()
    S = choose_landmarks(200, seed=1, landmarks=20)
    with pytest.raises(ValueError, match="residual has 199 entries but the kernel has N = 200"):
        nystrom_from_rows(H[S], S, 1.0, u0[:-1])
    bad = H[S].copy()
    bad[0, 3] = np.nan
    with pytest.raises(ValueError, match="contain NaN or inf"):
        nystrom_from_rows(bad, S, 1.0, u0)
    with pytest.raises(ValueError, match="kernel is zero on the landmark rows"):
        nystrom_from_rows(np.zeros_like(H[S]), S, 1.0, u0)
    x, _, _, _ = paper_simple_function(n=40, n_train=30, seed=0)
    with pytest.raises(ValueError, match="block_rows must be a positive number of rows"):
        nystrom_kernel(paper_mlp(width=8, seed=0), x, np.zeros(30), landmarks=5, block_rows=0)


def test_too_few_rows_for_the_nystrom_path_are_refused_with_the_way_out():
    stopper, _ = _stopper(n=5, kernel="nystrom")
    with pytest.raises(ValueError, match="n = 5 training rows are too few .* kernel='dense'"):
        stopper.start()


def test_a_rank_one_kernel_gives_the_dense_decision_on_the_nystrom_path():
    # Only the output bias trains: H = 1 1^T / N, one nonzero eigenvalue.
    x, y, _, _ = paper_simple_function(n=210, n_train=200, seed=0)
    decisions = {}
    for kernel in ("dense", "nystrom"):
        model = paper_mlp(width=16, seed=0)
        opt = torch.optim.SGD([model[-1].bias], lr=0.05)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            decisions[kernel] = REMLStopper(
                model, x, y, optimizer=opt, kernel=kernel, landmarks=20
            ).start()
    dense, nystrom = decisions["dense"], decisions["nystrom"]
    assert nystrom.approximation.rank == 1
    assert nystrom.test.pvalue == pytest.approx(dense.test.pvalue, rel=1e-6)
    # reml-power also weighs the dense kernel's rounding-level eigenvalues (about 1e-16), which
    # the Nystrom tail holds as one cluster: 0.7% apart here, the others agree to 1e-6.
    for name, fit in dense.criteria.fits.items():
        rel = 1e-2 if name in ("reml-power", "average") else 1e-6
        assert nystrom.criteria.fits[name].t == pytest.approx(fit.t, rel=rel), name


def test_bad_landmarks_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="between 3 and the number of rows"):
        choose_landmarks(10, seed=0, landmarks=11)
    with pytest.raises(ValueError, match="landmarks must be at least 3"):
        StopperOptions(landmarks=2)
    with pytest.raises(ValueError, match="kernel must be one of"):
        StopperOptions(kernel="sketch")
    with pytest.raises(ValueError, match="refresh_every_n_steps needs the dense kernel"):
        StopperOptions(kernel="nystrom", refresh_every_n_steps=10)


def _stopper(n=400, **options):
    x, y, _, _ = paper_simple_function(n=n + 10, n_train=n, seed=0)
    model = paper_mlp(width=64, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return REMLStopper(model, x, y, optimizer=opt, **options), model


def test_auto_takes_the_nystrom_path_when_the_dense_kernel_exceeds_the_budget():
    # Dense peak about 2 x 8 x 400^2 = 2.6 MB > 2 MB: Nystrom, with as many landmarks as half
    # the budget holds at 8 x 8 m^2 bytes (sqrt(2e6 / 2 / 64) = 125), at most n / 2 = 200.
    stopper, _ = _stopper(memory_budget_bytes=2_000_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        decision = stopper.start()
    assert decision.approximation is not None
    assert decision.approximation.landmarks == 125
    assert "Nystrom spectrum (M10) from 125 landmark rows" in str(decision)
    assert stopper.spectrum.dim == 400
    dense, _ = _stopper(memory_budget_bytes=10_000_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert dense.start().approximation is None


def test_nystrom_stop_times_are_near_the_dense_ones_and_the_test_agrees():
    decisions = {}
    for kernel in ("dense", "nystrom"):
        stopper, _ = _stopper(kernel=kernel, landmarks=200, test_covariates="f0")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            decisions[kernel] = stopper.start()
    dense, approx = decisions["dense"], decisions["nystrom"]
    assert approx.train == dense.train
    assert approx.test.n_fixed == dense.test.n_fixed == 1
    # Seeded draw, n = 400, half the rows as landmarks: measured +0.2% for the paper's REML and
    # -2.5% ... +6.3% for the later criteria; the tolerance leaves room for BLAS round-off only.
    assert approx.criteria.fits["reml"].t == pytest.approx(dense.criteria.fits["reml"].t, rel=0.01)
    for name in ("reml-linear", "gcv"):
        assert approx.criteria.fits[name].t == pytest.approx(
            dense.criteria.fits[name].t, rel=0.1
        ), name


def test_a_nystrom_decision_survives_a_checkpoint_and_leaves_the_rngs_alone():
    stopper, model = _stopper(kernel="nystrom", landmarks=100, seed=3)
    torch_state = torch.get_rng_state()
    np_state = np.random.get_state()[1].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        decision = stopper.start()
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state)
    state = stopper.state_dict()
    again, _ = _stopper(kernel="nystrom", landmarks=100, seed=3)
    again.load_state_dict(state)
    resumed = again.start()
    assert resumed.approximation == decision.approximation
    assert resumed.target_steps == decision.target_steps
    assert math.isfinite(decision.approximation.tail_eigenvalue)


def test_the_nystrom_path_refuses_refreshes_it_cannot_measure():
    stopper, _ = _stopper(memory_budget_bytes=2_000_000, refresh_every_n_steps=50)
    with pytest.raises(ValueError, match="refresh_every_n_steps needs the dense kernel"):
        stopper.start()


def test_the_trajectory_rule_reads_the_exact_h_u0_on_the_nystrom_path():
    stops = {}
    for kernel in ("dense", "nystrom"):
        stopper, model = _stopper(kernel=kernel, landmarks=200, rule="trajectory")
        x, y = stopper._data
        opt = stopper.optimizer
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stopper.start()
        if kernel == "nystrom":
            H = empirical_ntk(model, x)
            u0 = stopper._baseline.u0
            # H u0 by one vjp and one jvp in the model's float32: float32-accurate.
            torch.testing.assert_close(
                stopper._kernel.Hu0, H @ u0, rtol=1e-4, atol=1e-6 * float(H.abs().max())
            )
        for _ in range(3000):
            opt.zero_grad()
            (0.5 * ((model(x) - y) ** 2).mean()).backward()
            opt.step()
            if stopper.step():
                break
        stops[kernel] = stopper.stop_step
    # D reads H u0 and lambda-bar = tr H / N, both exact on this path: the same stop step
    # (61) was measured; 2% allows for float32 products.
    assert stops["nystrom"] == pytest.approx(stops["dense"], rel=0.02)


def test_default_landmarks_keep_the_cost_within_that_of_8192_columns_at_n_100000():
    from remlstop._spectra import default_landmarks

    assert default_landmarks(30_000, 1, None) == 8192
    assert default_landmarks(100_000, 1, None) == 8192
    assert default_landmarks(50_000, 2, None) == 4096
    # sqrt(10^5 / 2 x 10^5) x 8,192 = 5,792 columns, then 4,096 from N = 4 x 10^5 on.
    assert default_landmarks(200_000, 1, None) == 5792
    assert default_landmarks(10**6, 1, None) == 4096
    assert default_landmarks(10**6, 4, None) == 1024
    # Half of a 4 GB budget at 8 x 8 (m K)^2 bytes: sqrt(2 x 10^9 / 64) = 5,590 columns.
    assert default_landmarks(100_000, 1, 4 * 10**9) == 5590
    assert default_landmarks(100_000, 2, 4 * 10**9) == 2795
    with pytest.raises(MemoryError, match="not even 3 landmark rows"):
        default_landmarks(100_000, 1, 500)


def test_auto_keeps_a_cpu_on_the_dense_path_up_to_n_20000_only():
    from remlstop._spectra import plan

    cpu = torch.device("cpu")
    roomy = StopperOptions(memory_budget_bytes=10**13)
    assert plan(20_000, 1, roomy, cpu) == ("dense", None)
    assert plan(20_001, 1, roomy, cpu) == ("nystrom", 8192)
    assert plan(10_001, 2, roomy, cpu) == ("nystrom", 4096)
    assert plan(20_001, 1, StopperOptions(kernel="dense"), cpu) == ("dense", None)
    assert plan(5_000, 1, StopperOptions(kernel="nystrom"), cpu) == ("nystrom", 2500)
    with pytest.raises(ValueError, match="only n = 300 training rows"):
        plan(300, 1, StopperOptions(kernel="nystrom", landmarks=300), cpu)
    with pytest.raises(MemoryError, match="not even 3 landmark rows"):
        plan(10**6, 1, StopperOptions(memory_budget_bytes=500), cpu)
    # Explicit landmarks: 64 x 20,000^2 bytes = 25.6 GB do not fit 10 GB; 10,000 (6.4 GB) do.
    tight = dict(kernel="nystrom", memory_budget_bytes=10**10)
    with pytest.raises(MemoryError, match="need about 23.8 GB .* pass fewer landmarks"):
        plan(10**6, 1, StopperOptions(landmarks=20_000, **tight), cpu)
    assert plan(10**6, 1, StopperOptions(landmarks=10_000, **tight), cpu) == ("nystrom", 10_000)


def test_auto_on_a_gpu_takes_the_dense_path_only_where_the_host_can_decompose_it(monkeypatch):
    from remlstop import _spectra

    cuda = torch.device("cuda", 0)
    roomy = StopperOptions(memory_budget_bytes=10**13)
    assert _spectra.plan(20_000, 1, roomy, cuda) == ("dense", None)
    assert _spectra.plan(20_001, 1, roomy, cuda) == ("nystrom", 8192)
    # A card with room for the kernel, a host without room for its 2 x 8 x 10^8 byte spectrum.
    free = {"cuda": 10**12, "cpu": 10**9}
    monkeypatch.setattr(_spectra, "_available_bytes", lambda device: free[device.type])
    assert _spectra.plan(10_000, 1, StopperOptions(), cuda)[0] == "nystrom"
    free["cpu"] = 2 * 10**9
    assert _spectra.plan(10_000, 1, StopperOptions(), cuda) == ("dense", None)
    free["cuda"] = 10**9
    assert _spectra.plan(10_000, 1, StopperOptions(), cuda)[0] == "nystrom"


def test_the_row_gram_is_accumulated_exactly_across_panels_and_blocks(monkeypatch):
    from remlstop import nystrom

    monkeypatch.setattr(nystrom, "_PANEL", 7)
    rng = np.random.default_rng(5)
    C = rng.standard_normal((20, 45))
    G = np.zeros((20, 20))
    for cols in (slice(0, 13), slice(13, 45)):
        nystrom._add_gram(G, np.ascontiguousarray(C[:, cols]))
    np.testing.assert_allclose(np.tril(G), np.tril(C @ C.T), rtol=1e-12, atol=1e-12)


def test_streamed_landmark_rows_of_a_cnn_are_the_dense_kernels():
    torch.manual_seed(0)
    x = torch.randn(36, 1, 8, 8, dtype=torch.float64)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(64, 2),
    ).double()
    H = empirical_ntk(model, x).numpy()
    u0 = np.random.default_rng(2).standard_normal(72)
    factor = nystrom_kernel(model, x, u0, landmarks=9, seed=3, block_rows=5)
    assert factor.kernel_path == "layerwise"
    _assert_blocks_are_the_dense_kernels(factor, H, u0)
    assert factor.trace == pytest.approx(np.trace(H), rel=1e-10)
