"""take_rows / put_rows: the slice fast path and the index path give what plain indexing gives."""

import pytest
import torch

from nextserve.forward_batch import put_rows, take_rows


@pytest.mark.parametrize("rows", [[0, 1, 2, 3], [0], [1, 2], [3, 0, 2], []])
def test_take_and_put_rows_equal_indexing(rows):
    src = torch.arange(10, 20)
    assert torch.equal(take_rows(src, rows), src[torch.tensor(rows, dtype=torch.long)])
    dst, ref = torch.zeros(6, dtype=torch.long), torch.zeros(6, dtype=torch.long)
    values = torch.arange(100, 100 + len(rows))
    put_rows(dst, rows, values)
    ref[torch.tensor(rows, dtype=torch.long)] = values
    assert torch.equal(dst, ref)


def test_take_rows_of_a_prefix_is_a_view():
    src = torch.arange(8)
    assert take_rows(src, [0, 1, 2]).data_ptr() == src.data_ptr()
