"""quantile: torch.quantile's interpolation, also past its input-size limit."""

from __future__ import annotations

import pytest
import torch

from workers.quantile import quantile

QS = (0.0, 0.01, 0.5, 0.93, 0.9995, 1.0)


def test_equals_torch_quantile_over_all_elements_and_along_a_dimension() -> None:
    values = torch.rand(7, 143, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for q in QS:
        assert torch.equal(quantile(values, q), torch.quantile(values.flatten(), q))
        assert torch.equal(quantile(values, q, dim=1), torch.quantile(values, q, dim=1))


def test_past_the_size_limit_the_same_values(monkeypatch: pytest.MonkeyPatch) -> None:
    values = torch.rand(5, 1001, generator=torch.Generator().manual_seed(1))
    expected = [(torch.quantile(values.flatten(), q), torch.quantile(values, q, dim=1)) for q in QS]
    monkeypatch.setattr("workers.quantile._TORCH_LIMIT", 10)
    for q, (flat, rows) in zip(QS, expected, strict=True):  # float32: to the last bit or so
        torch.testing.assert_close(quantile(values, q), flat, rtol=1e-6, atol=0)
        torch.testing.assert_close(quantile(values, q, dim=1), rows, rtol=1e-6, atol=0)
