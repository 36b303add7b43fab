"""Paired differences over training seeds: the t table against the t distribution itself, and the formatting that
decides which differences are claimed."""

from __future__ import annotations

import math

import pytest

from adakd.report.stats import (
    T95,
    format_difference,
    format_mean_std,
    paired_difference,
    plot_differences,
    t95,
)


def _t_cdf_above_zero(q: float, df: int, n: int = 20000) -> float:
    """∫_0^q of Student's t density (float64 Simpson): the mass between 0 and q, 0.475 at the 97.5% quantile."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(x: float) -> float:
        return math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))

    h = q / n
    total = density(0.0) + density(q)
    total += sum((4 if i % 2 else 2) * density(i * h) for i in range(1, n))
    return total * h / 3


@pytest.mark.parametrize("df", sorted(T95))
def test_t_table_is_the_975_quantile(df):
    assert _t_cdf_above_zero(T95[df], df) == pytest.approx(0.475, abs=5e-5)  # the table rounds to 3 decimals


def test_t95_is_conservative_between_tabulated_values():
    assert t95(2) == T95[2]
    assert t95(11) == T95[10] > T95[12]  # the wider interval of the tabulated df below
    assert t95(500) == 1.96 and math.isnan(t95(0))


def test_paired_difference_closed_form():
    baseline = {0: 10.0, 1: 12.0, 2: 14.0, 9: 99.0}
    method = {0: 11.0, 1: 13.2, 2: 15.1, 5: 0.0}  # seeds 5 and 9 have no partner and are ignored
    d = paired_difference(method, baseline)  # differences 1.0, 1.2, 1.1
    assert d["n"] == 3 and d["mean"] == pytest.approx(1.1) and d["std"] == pytest.approx(0.1)
    half = 4.303 * 0.1 / math.sqrt(3)
    assert (d["low"], d["high"]) == pytest.approx((1.1 - half, 1.1 + half))
    one = paired_difference({0: 3.0}, {0: 1.0})
    assert one["mean"] == 2.0 and math.isnan(one["low"]) and format_difference(one) == "+2.00 (1 pair)"
    assert paired_difference({1: 1.0}, {0: 1.0}) is None and format_difference(None) == "–"


def test_a_difference_is_starred_only_when_its_interval_excludes_zero():
    assert format_difference({"mean": 1.1, "low": 0.85, "high": 1.35, "n": 3}) == "+1.10 [+0.85, +1.35] *"
    assert format_difference({"mean": -1.0, "low": -2.0, "high": -0.01, "n": 3}).endswith("*")
    assert format_difference({"mean": 0.1, "low": -0.15, "high": 0.35, "n": 3}) == "+0.10 [-0.15, +0.35]"
    assert format_mean_std([1.0, 3.0]) == f"2.00 ± {math.sqrt(2):.2f}"
    assert format_mean_std([1.0]) == "1.00" and format_mean_std([]) == "–"


def test_plot_differences_writes_a_figure(tmp_path):
    d = paired_difference({0: 1.0, 1: 2.0, 2: 2.5}, {0: 0.0, 1: 0.5, 2: 1.0})
    path = plot_differences([("a", {"sampled": d, "greedy": None}), ("b", {"greedy": d})], tmp_path / "p.png", "x")
    assert path.stat().st_size > 5_000
