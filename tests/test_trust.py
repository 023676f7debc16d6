"""Adaptive trust (node/market/trust.py): the policy, and the targets bench/spotcheck.py simulates, in expectation."""

from __future__ import annotations

from node.market.trust import CREDIT_START, FIRST_CHECKS, NOISY_FACTOR, STRIKES, Trust, probability_after
from node.payments.payer import CREDIT_TOKENS
from node.payments.policy import job_cost

BASE = 0.05
#: docs/benchmarks.md's short and long jobs (prompt, answer tokens), as bench/spotcheck.py uses them.
TYPICAL_JOBS = [(42, 256), (619, 256)]


def test_a_stranger_is_always_checked_on_its_first_jobs_then_less_as_checks_pass():
    trust = Trust()
    seen = []
    for _ in range(200):
        seen.append(trust.spot_probability("w", BASE))
        trust.passed("w")
    assert seen[:FIRST_CHECKS] == [1.0] * FIRST_CHECKS
    assert all(a >= b for a, b in zip(seen, seen[1:], strict=False))  # falls as checks pass, never rises
    assert seen[FIRST_CHECKS + 1] < 1.0
    assert min(seen) == BASE and seen[-1] == BASE  # down to the requester's own probability, never below
    assert trust.verified("w") == 200 and trust.spot_probability("other", BASE) == 1.0  # per worker


def test_a_requester_that_asked_for_no_spot_checks_gets_none():
    assert Trust().spot_probability("w", 0.0) == 0.0
    assert probability_after(0, 0.0) == 0.0


def test_noisy_workers_are_checked_more_and_an_explicit_probability_of_one_stays_one():
    trust = Trust()
    for _ in range(500):
        trust.passed("w")
    assert trust.spot_probability("w", BASE) == BASE
    assert trust.spot_probability("w", BASE, exact=False) == NOISY_FACTOR * BASE
    assert trust.spot_probability("w", 1.0) == 1.0 and trust.spot_probability("w", 0.9, exact=False) == 1.0


def test_the_credit_window_starts_small_and_grows_with_verified_history():
    trust = Trust()
    windows = []
    for _ in range(30):
        windows.append(trust.credit_tokens("w"))
        trust.passed("w")
    assert windows[0] == CREDIT_START < CREDIT_TOKENS
    assert all(a <= b for a, b in zip(windows, windows[1:], strict=False))
    assert windows[-1] == CREDIT_TOKENS  # the payer's fixed window is the most
    assert trust.credit_tokens("stranger") == CREDIT_START


def test_a_caught_worker_starts_over_and_is_always_checked():
    trust = Trust()
    for _ in range(50):
        trust.passed("w")
    trust.failed("w")
    assert trust.verified("w") == 0
    assert trust.credit_tokens("w") == CREDIT_START
    for _ in range(50):
        assert trust.spot_probability("w", BASE) == 1.0
        trust.passed("w")


def test_the_record_is_bounded_and_forgets_the_least_verified():
    trust = Trust(max_peers=3)
    for _ in range(5):
        trust.passed("old")
    for peer in ("a", "b", "c", "d"):
        trust.passed(peer)
    assert len(trust.peers) == 3 and trust.verified("old") == 5  # strangers come and go; history stays


def _checks_distribution(jobs: int) -> list[float]:
    """P(an honest worker has passed n checks) after ``jobs`` jobs under the policy (exact, no sampling)."""
    dist = [1.0] + [0.0] * jobs
    for _ in range(jobs):
        nxt = [0.0] * (jobs + 1)
        for n, weight in enumerate(dist):
            if weight:
                p = probability_after(n, BASE)
                nxt[n] += weight * (1 - p)
                nxt[n + 1] += weight * p
        dist = nxt
    return dist


def test_honest_spend_over_the_first_100_jobs_is_at_most_two_percent_in_expectation():
    """Expected checks over 100 jobs × a check's cost (prompt + answer + 1 tokens at a tenth of the job price)
    over the expected job spend: the simulation's mean (bench/spotcheck.py), computed exactly."""
    dist = _checks_distribution(100)
    checks = sum(n * weight for n, weight in enumerate(dist))
    price = 10**6
    job = sum(job_cost(p, a, price) for p, a in TYPICAL_JOBS) / len(TYPICAL_JOBS)
    check = sum(job_cost(p + a, 1, price // 10) for p, a in TYPICAL_JOBS) / len(TYPICAL_JOBS)
    assert checks * check / (100 * job) <= 0.02
    assert checks >= FIRST_CHECKS + 5  # and the policy does not get there by checking nobody


def _unchecked_cheats(rate: float, jobs: int = 2000) -> float:
    """Expected unchecked cheated jobs of one identity that cheats on each job with probability ``rate``,
    until a check of a cheated job catches it (exact, over its first ``jobs`` jobs)."""
    alive = {0: 1.0}  # passed checks → probability of being uncaught with that history
    unchecked = 0.0
    for _ in range(jobs):
        nxt: dict[int, float] = {}
        for n, weight in alive.items():
            p = probability_after(n, BASE)
            unchecked += weight * rate * (1 - p)
            nxt[n] = nxt.get(n, 0.0) + weight * (rate * (1 - p) + (1 - rate) * (1 - p))
            nxt[n + 1] = nxt.get(n + 1, 0.0) + weight * (1 - rate) * p
        alive = {n: w for n, w in nxt.items() if w > 1e-12}
    return unchecked


def test_a_cheater_that_takes_a_new_key_after_each_catch_gets_at_most_one_unchecked_cheat_per_key():
    assert _unchecked_cheats(1.0) == 0.0  # every first job is checked
    assert _unchecked_cheats(0.5) <= 1.0


def test_statistical_failures_are_strikes_and_only_enough_in_a_row_ban():
    trust = Trust()
    for _ in range(FIRST_CHECKS + 4):
        trust.passed("w")
    assert trust.spot_probability("w", BASE, exact=False) < 1 and trust.credit_tokens("w") > CREDIT_START
    assert not trust.struck("w")  # the first: a stranger again, not caught
    assert trust.spot_probability("w", BASE, exact=False) == 1.0 and trust.credit_tokens("w") == CREDIT_START
    assert trust.verified("w") == 0 and not trust.peers["w"].caught
    trust.passed("w")  # a pass between clears the strikes
    assert not trust.struck("w")
    more = [trust.struck("w") for _ in range(STRIKES - 1)]  # … and STRIKES in a row ban
    assert more[-1] and not any(more[:-1])
