"""λ tuning: the grid's best value, and past an edge only while the edge keeps winning."""

from __future__ import annotations

import pytest

from tvq.bench.matrix import EDGE_STEPS, LAMBDA_GRID, edge_values, tune_value


def counting(peak: float):
    tried: list[float] = []

    def score(value: float) -> float:
        tried.append(value)
        return -abs(value - peak)

    return score, tried


def test_an_interior_optimum_is_chosen_from_the_grid_alone():
    score, tried = counting(0.4)
    assert tune_value(LAMBDA_GRID, score) == 0.4
    assert tried == list(LAMBDA_GRID)


def test_a_winning_top_edge_extends_by_the_last_step_until_it_stops_improving():
    score, tried = counting(1.65)
    assert tune_value(LAMBDA_GRID, score) == pytest.approx(1.6)
    assert tried[len(LAMBDA_GRID):] == pytest.approx([1.3, 1.6, 1.9])  # 1.9 is worse: stop


def test_a_winning_bottom_edge_halves_and_lambda_stays_positive():
    score, tried = counting(0.0)
    best = tune_value(LAMBDA_GRID, score)
    assert best == pytest.approx(0.1 / 2**EDGE_STEPS) and best > 0
    assert len(tried) == len(LAMBDA_GRID) + EDGE_STEPS  # bounded


def test_ties_keep_the_first_value_and_do_not_extend_on_a_flat_score():
    tried: list[float] = []
    assert tune_value((0.5, 1.0), lambda v: tried.append(v) or 0.0) == 0.5
    assert tried == [0.5, 1.0, 0.25]  # the edge 0.5 won only by order: one look past it, no gain


def test_edge_values_follow_the_grid():
    assert edge_values((0.4, 0.7, 1.0), upward=True) == pytest.approx([1.3, 1.6, 1.9, 2.2])
    assert edge_values((0.4, 0.7), upward=False) == pytest.approx([0.2, 0.1, 0.05, 0.025])
    with pytest.raises(ValueError):
        tune_value((), lambda v: 0.0)
