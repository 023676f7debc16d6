"""Payment arithmetic (the deposit admission check, ``deposit_problem``, is tested in test_payment_seam.py)."""

from __future__ import annotations

from node.payments.policy import job_cost, worst_case_cost


def test_costs_round_up_to_a_base_unit():
    assert job_cost(10, 5, 1000) == 15
    assert job_cost(1, 0, 1) == 1  # 0.001 rounds up
    assert job_cost(0, 0, 5) == 0
    assert job_cost(300, 700, 7) == 7
    assert worst_case_cost(100, 256, 50) == job_cost(100, 256, 50) == 18
