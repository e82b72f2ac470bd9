"""Reliability of remlstop.data: each wrong way to pass the training data gets its own advice."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from remlstop.data import collect_xy
from remlstop.stopper import REMLStopper

X = torch.randn(120, 5, generator=torch.Generator().manual_seed(0))
Y = torch.sin(2 * X[:, :1])


@pytest.mark.parametrize(
    "data",
    [(X.numpy(), Y.numpy()), [X.numpy(), Y.numpy()], (X, Y.numpy()), X.numpy()],
    ids=["numpy_pair", "numpy_list", "numpy_targets", "numpy_inputs_alone"],
)
def test_numpy_data_is_told_to_convert_to_tensors(data) -> None:
    advice = r"torch tensors.*torch\.as_tensor\(X, dtype=torch\.float32\)"
    with pytest.raises(TypeError, match=advice):
        collect_xy(data)


def test_numpy_data_through_the_stopper() -> None:
    model = torch.nn.Linear(5, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    stopper = REMLStopper(model, X.numpy(), Y.numpy(), optimizer=opt)
    with pytest.raises(TypeError, match=r"ndarray.*torch\.as_tensor"):
        stopper.start()


def test_dataloader_with_separate_targets_is_told_to_pass_the_loader_alone() -> None:
    loader = DataLoader(TensorDataset(X, Y), batch_size=16)
    with pytest.raises(TypeError, match=r"DataLoader.*targets.*already yields.*alone"):
        collect_xy((loader, Y))
    model = torch.nn.Linear(5, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(TypeError, match=r"DataLoader.*targets.*already yields.*alone"):
        REMLStopper(model, loader, Y, optimizer=opt).start()


def test_three_tensors_are_told_that_weights_have_no_place() -> None:
    W = torch.ones(120)
    with pytest.raises(TypeError, match=r"3 tensors.*\(X, Y\) pair.*weights"):
        collect_xy((X, Y, W))


def test_lists_of_batches_and_custom_adapters_still_work() -> None:
    batches = [(X[:60], Y[:60]), (X[60:], Y[60:])]
    assert torch.equal(collect_xy(batches)[0], X)
    rows = [torch.cat([X[i : i + 40], Y[i : i + 40]], 1) for i in (0, 40, 80)]
    X2, Y2 = collect_xy(rows, batch_to_xy=lambda b: (b[:, :5], b[:, 5:]))
    assert torch.equal(X2, X) and torch.equal(Y2, Y)
