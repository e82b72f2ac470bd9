"""Tests for remlstop.data."""

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from remlstop.data import as_target_matrix, collect_xy, default_batch_adapter


def _xy(n=10, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g), torch.randn(n, k, generator=g)


# --- default_batch_adapter --------------------------------------------------------------------


def test_adapter_tuple_list_and_dicts():
    x, y = _xy()
    for batch in [(x, y), [x, y], {"x": x, "y": y}, {"input": x, "target": y}]:
        bx, by = default_batch_adapter(batch)
        assert bx is x and by is y


def test_adapter_prefers_x_y_keys():
    x, y = _xy()
    bx, by = default_batch_adapter({"x": x, "y": y, "input": y, "target": x})
    assert bx is x and by is y


def test_adapter_tensordataset_batch():
    x, y = _xy()
    batch = next(iter(DataLoader(TensorDataset(x, y), batch_size=4)))
    bx, by = default_batch_adapter(batch)
    assert torch.equal(bx, x[:4]) and torch.equal(by, y[:4])


@pytest.mark.parametrize(
    "batch",
    [
        torch.zeros(3),
        (torch.zeros(3),),
        (torch.zeros(3), torch.zeros(3), torch.zeros(3)),
        {"a": 1},
        "xy",
    ],
)
def test_adapter_rejects_other_batches(batch):
    with pytest.raises(TypeError, match="batch_to_xy"):
        default_batch_adapter(batch)


def test_adapter_rejects_non_tensors():
    with pytest.raises(TypeError, match="torch tensors"):
        default_batch_adapter(([1.0, 2.0], [1.0, 2.0]))


# --- collect_xy -------------------------------------------------------------------------------


def test_collect_from_tensors():
    x, y = _xy()
    X, Y = collect_xy((x, y))
    assert torch.equal(X, x) and torch.equal(Y, y)


def test_collect_from_dataloader_concatenates_and_detaches():
    x, y = _xy(n=11)
    x.requires_grad_(True)
    X, Y = collect_xy(DataLoader(TensorDataset(x, y), batch_size=4))
    assert torch.equal(X, x.detach()) and torch.equal(Y, y)
    assert not X.requires_grad


def test_collect_from_list_of_batches():
    x, y = _xy(n=9)
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]
    X, Y = collect_xy(batches)
    assert torch.equal(X, x) and torch.equal(Y, y)


def test_collect_with_custom_adapter():
    x, y = _xy(n=8)

    class Triples(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"img": x[i], "label": y[i], "id": i}

    loader = DataLoader(Triples(), batch_size=3)
    with pytest.raises(TypeError, match="batch_to_xy"):
        collect_xy(loader)
    X, Y = collect_xy(loader, batch_to_xy=lambda b: (b["img"], b["label"]))
    assert torch.equal(X, x) and torch.equal(Y, y)


def test_collect_does_not_disturb_global_rng():
    x, y = _xy(n=50)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    loader = DataLoader(TensorDataset(x, y), batch_size=7, shuffle=True)
    X, Y = collect_xy(loader)
    assert torch.equal(torch.random.get_rng_state(), before)
    # same rows, shuffled
    assert torch.equal(torch.sort(X[:, 0]).values, torch.sort(x[:, 0]).values)
    # and training sees the same shuffle it would have seen without remlstop
    torch.manual_seed(123)
    reference = torch.cat(
        [b[0] for b in DataLoader(TensorDataset(x, y), batch_size=7, shuffle=True)]
    )
    torch.manual_seed(123)
    collect_xy(loader)
    assert torch.equal(torch.cat([b[0] for b in loader]), reference)


def test_collect_restores_rng_after_error_mid_iteration():
    x, y = _xy(n=12)
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)
    seen = []

    def adapter(batch):
        seen.append(batch)
        if len(seen) == 2:
            raise RuntimeError("adapter failed")
        return batch[0], batch[1]

    torch.manual_seed(7)
    before = torch.random.get_rng_state()
    with pytest.raises(RuntimeError, match="adapter failed"):
        collect_xy(loader, batch_to_xy=adapter)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_max_samples_subset_is_seeded_and_leaves_global_rng():
    x, y = _xy(n=40)
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    X1, Y1 = collect_xy((x, y), max_samples=12, generator=3)
    X2, _ = collect_xy((x, y), max_samples=12, generator=torch.Generator().manual_seed(3))
    X3, _ = collect_xy((x, y), max_samples=12, generator=4)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert X1.shape == (12, 3) and Y1.shape == (12, 2)
    assert torch.equal(X1, X2) and not torch.equal(X1, X3)
    # rows stay paired and in original order
    idx = torch.tensor([int(torch.nonzero((x == r).all(dim=1))[0]) for r in X1])
    assert torch.equal(idx, torch.sort(idx).values)
    assert torch.equal(y[idx], Y1)


def test_max_samples_at_least_n_keeps_all():
    x, y = _xy(n=10)
    X, _ = collect_xy((x, y), max_samples=10)
    assert torch.equal(X, x)


def test_max_samples_validated():
    with pytest.raises(ValueError, match="max_samples"):
        collect_xy(_xy(), max_samples=2)


def test_empty_dataloader():
    x, y = _xy(n=0)
    with pytest.raises(ValueError, match="the train dataloader yielded no batches"):
        collect_xy(DataLoader(TensorDataset(x, y), batch_size=4))


def test_row_count_mismatch():
    with pytest.raises(ValueError, match="same number of rows"):
        collect_xy((torch.randn(5, 2), torch.randn(4, 1)))


@pytest.mark.parametrize("where", ["x", "y"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_refused(where, bad):
    x, y = _xy()
    (x if where == "x" else y)[2, 0] = bad
    with pytest.raises(ValueError, match=f"{where.upper()} contains NaN or inf"):
        collect_xy((x, y))


@pytest.mark.parametrize(
    "labels", [torch.arange(10), torch.arange(10) % 2 == 0, torch.arange(10).to(torch.int32)]
)
def test_class_labels_refused(labels):
    with pytest.raises(TypeError, match="(?i)class labels.*one-hot.*loss='mse'"):
        collect_xy((torch.randn(10, 2), labels))


def test_complex_targets_refused():
    with pytest.raises(TypeError, match="real floating point"):
        collect_xy((torch.randn(5, 2), torch.randn(5, dtype=torch.complex64)))


def test_integer_inputs_allowed():
    X, _ = collect_xy((torch.arange(10).reshape(5, 2), torch.randn(5)))
    assert X.dtype == torch.int64


def test_too_few_rows():
    with pytest.raises(ValueError, match="at least 3"):
        collect_xy((torch.randn(2, 2), torch.randn(2)))


def test_inconsistent_batch_shapes():
    with pytest.raises(ValueError, match="inconsistent shapes"):
        collect_xy([(torch.randn(3, 2), torch.randn(3)), (torch.randn(3, 4), torch.randn(3))])


def test_bad_data_type():
    with pytest.raises(TypeError, match="iterable of batches"):
        collect_xy(torch.randn(5, 2))
    with pytest.raises(TypeError, match="iterable of batches"):
        collect_xy(42)


# --- as_target_matrix -------------------------------------------------------------------------


def test_as_target_matrix_shapes():
    assert as_target_matrix(torch.randn(7)).shape == (7, 1)
    assert as_target_matrix(torch.randn(7, 3)).shape == (7, 3)
    y = torch.randn(7, 2, 3)
    Y2 = as_target_matrix(y)
    assert Y2.shape == (7, 6)
    assert torch.equal(Y2.reshape(-1), y.reshape(-1))  # row-major flattening (M1)
    assert as_target_matrix(torch.randn(4, dtype=torch.float64)).dtype == torch.float64


def test_as_target_matrix_validates():
    with pytest.raises(TypeError, match="class labels"):
        as_target_matrix(torch.arange(4))
    with pytest.raises(ValueError, match="scalar"):
        as_target_matrix(torch.tensor(1.0))
