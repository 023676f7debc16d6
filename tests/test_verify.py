"""Verified inference: fingerprints, the judgement, honest work never flagged, every cheater caught.

The counting tests print their tallies (detections, honest checks, error
distribution) to the terminal even when they pass; the closing note and
docs/verification.md quote them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import replace

import numpy as np
import pytest
import trio

from node.errors import InvalidRequest
from node.inference import fingerprints
from node.inference.engine import PROBE_TOKENS, open_engine
from node.inference.fingerprints import Observations
from node.inference.sampling import FINISH_LENGTH, FINISH_STOP, SamplingParams
from node.verify import judge as verify
from tests import calibration, cheaters
from tests.calibration import answer, check, job

slow = pytest.mark.slow

# ------------------------------------------------------------------ the record format


def test_a_record_is_15_bytes_and_round_trips():
    packed = fingerprints.pack([5, 49151, (1 << 24) - 1], [5, 7, 8], [6, 9, 0], [17.25, 3.5, -1.0], [16.0, 3.0, -2.0],
                               [17.25, 1.0, -70000.0])  # fmt: skip
    assert len(packed) == 3 * fingerprints.RECORD_BYTES == 45
    back = fingerprints.unpack(packed)
    assert back.tokens.tolist() == [5, 49151, (1 << 24) - 1]
    assert back.top1.tolist() == [5, 7, 8] and back.top2.tolist() == [6, 9, 0]
    assert back.logit1.tolist() == [17.25, 3.5, -1.0]
    assert back.logit[2] == -np.inf  # beyond f16's range: it saturates, and never matches a real logit
    assert fingerprints.digest(packed) != fingerprints.digest(packed[:-1] + b"\0") and fingerprints.digest(b"") == b""


def test_records_that_cannot_be_packed_or_unpacked_are_refused():
    with pytest.raises(ValueError, match="24 bits"):
        fingerprints.pack([1 << 24], [0], [0], [0.0], [0.0], [0.0])
    with pytest.raises(ValueError, match="differ in length"):
        fingerprints.pack([1, 2], [0], [0], [0.0], [0.0], [0.0])
    with pytest.raises(ValueError, match="not a multiple of 15"):
        fingerprints.unpack(b"\0" * 16)


def test_the_recorder_keeps_the_top_two_and_the_sampled_token():
    recorder = fingerprints.Recorder()
    logits = np.array([0.5, 9.0, -3.0, 9.5, 2.0], dtype=np.float32)
    recorder.add(logits, 4)
    recorder.add(logits[::-1].copy(), 0)
    records = fingerprints.unpack(recorder.packed())
    assert records.tokens.tolist() == [4, 0]
    assert records.top1.tolist() == [3, 1] and records.top2.tolist() == [1, 3]
    assert records.logit1.tolist() == [9.5, 9.5] and records.logit2.tolist() == [9.0, 9.0]
    assert records.logit.tolist() == [2.0, 2.0]


# ------------------------------------------------------------------ the judgement, on made-up observations

SAMPLED = SamplingParams(max_tokens=4, temperature=0.7, seed=3)
GREEDY = SamplingParams(max_tokens=4, temperature=0.0)


def made_up(n: int = 4, **changes) -> tuple[Observations, fingerprints.Fingerprints]:
    """Records of n tokens and the observations of a verifier that saw exactly the same logits."""
    tokens = list(range(10, 10 + n))
    packed = fingerprints.pack(tokens, tokens, [1] * n, [15.0] * n, [14.0] * n, [15.0] * n)
    records = fingerprints.unpack(packed)
    base = dict(
        replayed=n, broken="", prompt_tokens=9, top=np.full(n, 15.0, np.float32), at_top1=np.full(n, 15.0, np.float32),
        at_top2=np.full(n, 14.0, np.float32), at_token=np.full(n, 15.0, np.float32), pick=np.array(tokens),
        allowed=np.ones(n, bool), gap=np.zeros(n), between=np.zeros(n), p=np.full(n, 0.6),
        entropy=np.full(n, 0.67), spread=np.full(n, 0.05), seeded=True, text="abcd"[:n], ends_on_eog=False,
        eog=np.zeros(n, bool), pick_eog=np.zeros(n, bool), stop_p=np.zeros(n),
    )  # fmt: skip
    base.update(changes)
    return Observations(**base), records


def judged(params=SAMPLED, *, said="abcd", finish=FINISH_LENGTH, tokens=4, prompt=9, noise=verify.GPU,
           **changes) -> verify.Verdict:  # fmt: skip
    """The verdict on a worker that reported ``said``, ``finish`` and ``prompt`` + ``tokens`` tokens, checked in
    class ``noise``; ``changes`` alter what the verifier observed."""
    obs, records = made_up(**changes)
    return verify.judge(obs, records, params, text=said, finish_reason=finish, prompt_tokens=prompt,
                        completion_tokens=tokens, noise=noise)  # fmt: skip


def test_identical_logits_pass():
    verdict = judged()
    assert verdict.ok and verdict.reason == "" and verdict.max_error == 0 and verdict.flips == 0
    assert verdict.regime == "gpu"
    assert judged(GREEDY).ok and judged(noise=verify.EXACT).ok and judged(GREEDY, noise=verify.CPU).ok


def test_in_the_exact_class_a_single_differing_pick_fails():
    """Same logits, chain and seed give the same pick: one flip (a slightly hotter sampler's) or one token outside
    the candidates is a cheat there, though a noisy class allows it."""
    one_flip = dict(pick=np.array([10, 11, 12, 14]), gap=np.array([0, 0, 0, 0.5]))
    assert "1 of 4 tokens differ from the seeded draw's" in judged(noise=verify.EXACT, **one_flip).reason
    assert judged(noise=verify.CPU, **one_flip).ok
    one_outside = dict(allowed=np.array([True, True, True, False]))
    assert "1 of 4 tokens are outside" in judged(noise=verify.EXACT, **one_outside).reason
    assert judged(noise=verify.GPU, **one_outside).ok
    greedy_flip = dict(pick=np.array([10, 11, 12, 14]), gap=np.array([0, 0, 0, 0.0]))  # a tie, picked the other way
    assert "1 of 4 tokens are not the most likely one" in judged(GREEDY, noise=verify.EXACT, **greedy_flip).reason


def test_the_noise_class_comes_from_the_claim_and_never_from_the_records():
    own = "0123456789abcdef"
    assert verify.noise_class(own, own) is verify.EXACT
    assert verify.noise_class("fedcba9876543210", own) is verify.CPU  # another CPU's exact class
    assert verify.noise_class("cpu", own) is verify.CPU and verify.noise_class("cpu:avx2", own) is verify.CPU
    assert verify.noise_class("", own) is verify.GPU and verify.noise_class("gpu", own) is verify.GPU
    assert verify.noise_class("", "") is verify.GPU  # claiming nothing never matches "no numerics"
    for wider, narrower in ((verify.GPU, verify.CPU), (verify.CPU, verify.EXACT)):
        for limit in ("logit", "mean", "tie", "flips", "outside"):
            assert getattr(wider, limit) >= getattr(narrower, limit)
    # the values are judged against the class's fixed limits
    noisy = dict(at_top1=np.full(4, 15.375, np.float32), at_top2=np.full(4, 14.375, np.float32),
                 at_token=np.full(4, 15.375, np.float32))  # fmt: skip
    assert judged(**noisy).ok and judged(noise=verify.CPU, **noisy).ok
    assert "off by 0.375, where this machine's numerics" in judged(noise=verify.EXACT, **noisy).reason


def seeded_flips(down: int, up: int = 0, n: int = 64, error: float = 0.0) -> verify.Verdict:
    """A seeded sampled answer of ``n`` tokens, checked in the GPU class, where ``down`` replayed picks differ
    toward a less likely token and ``up`` toward a more likely one; every record value off by ``error``."""
    gap = np.zeros(n)
    gap[:down], gap[down : down + up] = 0.3, -0.3
    pick = np.arange(10, 10 + n)
    pick[: down + up] = 999
    obs, records = made_up(
        n,
        pick=pick,
        gap=gap,
        text="x" * n,
        at_top1=np.full(n, 15 + error, np.float32),
        at_top2=np.full(n, 14 + error, np.float32),
        at_token=np.full(n, 15 + error, np.float32),
    )
    params = dataclasses.replace(SAMPLED, max_tokens=n)
    return verify.judge(obs, records, params, text="x" * n, finish_reason=FINISH_LENGTH, prompt_tokens=9,
                        completion_tokens=n, noise=verify.GPU)  # fmt: skip


def test_noisy_picks_are_held_to_fixed_allowances_and_must_flip_both_ways():
    """Honest noise flips seeded draws toward a less likely token as often as toward a more likely one; a hotter
    sampler's flips all go down. The allowances are the class's, whatever noise the records show."""
    for error in (0.0, 0.375):  # noise in the records buys nothing
        assert seeded_flips(8, 8, error=error).ok and seeded_flips(16, error=error).ok  # 2^-16 > 1e-5
        assert (
            "17 of 17 tokens that differ from the seeded draw's are less likely" in seeded_flips(17, error=error).reason
        )
        assert (
            seeded_flips(19, error=error).reason
            == "19 of 64 tokens differ from the seeded draw's toward less likely ones"
        )
        assert seeded_flips(18, 17, error=error).reason == "35 of 64 tokens differ from the seeded draw's"  # 2 + 64/2
    assert seeded_flips(17, 17).ok


def test_a_noisy_failure_on_counts_is_statistical_and_every_other_failure_is_not():
    """Only the pick counts and probabilities that honest noise crosses now and then make a failure
    ``statistical`` (a strike, node/market/trust.py); a bad bill, padding, an off logit or any failure in the
    exact class is a proof."""
    assert seeded_flips(19).statistical and seeded_flips(17).statistical and seeded_flips(18, 17).statistical
    assert not seeded_flips(8, 8).statistical  # a pass is never statistical
    far = judged(GREEDY, noise=verify.GPU, pick=np.array([10, 99, 12, 13]), gap=np.array([0, 2.5, 0, 0]))
    assert not far.ok and far.statistical
    assert judged(noise=verify.CPU, p=np.full(4, 0.01)).statistical  # surprisal
    assert not judged(
        GREEDY, noise=verify.EXACT, pick=np.array([10, 99, 12, 13]), gap=np.array([0, 2.5, 0, 0])
    ).statistical
    assert not judged(noise=verify.EXACT, pick=np.array([1, 2, 3, 13])).statistical
    ended = dict(pick=np.array([10, 98, 99, 13]), pick_eog=np.array([False, True, True, False]))
    for proof in (judged(prompt=12), judged(tokens=3), judged(**ended), judged(text="abce"),
                  judged(at_token=np.array([15.0, 15.0, 11.0, 15.0], np.float32))):  # fmt: skip
        assert not proof.ok and not proof.statistical, proof.reason


def test_the_billed_usage_must_be_the_verifiers_own_count():
    assert judged(prompt=9).ok
    assert judged(prompt=12).reason == "12 prompt tokens billed where the prompt has 9"
    assert judged(tokens=5).reason == "5 completion tokens billed for 4 fingerprints"


def test_an_answer_that_goes_on_after_the_model_ended_it_fails():
    # an end-of-generation record in the middle: the worker went on after sampling it
    inner = judged(eog=np.array([False, True, False, False]))
    assert inner.reason == "token 1 ends the answer (end-of-generation), and the answer goes on"
    # greedy: the argmax was end-of-generation and the worker went on; exact: no near-tie; noisy: within `tie`
    ended = dict(pick=np.array([10, 11, 99, 13]), pick_eog=np.array([False, False, True, False]))
    for noise in (verify.EXACT, verify.CPU, verify.GPU):
        far = judged(GREEDY, noise=noise, gap=np.array([0, 0, 1.5, 0]), **ended)
        assert far.reason == "token 2: the answer goes on where the model ends it (end-of-generation)", noise
    assert not judged(GREEDY, noise=verify.EXACT, gap=np.array([0, 0, 0.2, 0]), **ended).ok
    assert judged(GREEDY, noise=verify.GPU, gap=np.array([0, 0, 0.2, 0]), **ended).ok  # a near-tie, within noise
    # seeded: the replayed draw ended it; exact: at once; noisy: a draw at the boundary may flip, so at the second
    assert "goes on where the model ends it" in judged(noise=verify.EXACT, **ended).reason
    assert judged(gap=np.array([0, 0, 3.0, 0]), **ended).ok
    twice = dict(pick=np.array([10, 98, 99, 13]), pick_eog=np.array([False, True, True, False]))
    assert judged(**twice).reason == "token 2: the answer goes on where the model ends it (end-of-generation)"
    # unseeded: the model would have stopped with probability 0.99 at each of three positions where it went on
    unseeded = dict(seeded=False, pick=np.array([10, 11, 12, 13]))
    assert judged(stop_p=np.array([0.5, 0.5, 0.5, 0.0]), **unseeded).ok
    stopped = judged(stop_p=np.array([0.995, 0.995, 0.995, 0.0]), **unseeded)
    assert stopped.reason.startswith("the answer goes on where the model would have ended it: with probability 1")


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        (dict(at_token=np.array([15.0, 15.0, 11.0, 15.0], np.float32)), "token 2: a logit is off by 4.00"),
        (dict(at_top2=np.full(4, 15.6, np.float32), at_token=np.full(4, 15.6, np.float32)), "on average"),
        (dict(top=np.array([15.0, 19.0, 15.0, 15.0], np.float32)), "token 1: the claimed top token is 4.00 below"),
        (dict(allowed=np.array([False, False, True, True]), noise=verify.EXACT), "2 of 4 tokens are outside"),
        (dict(pick=np.array([1, 2, 3, 13]), noise=verify.EXACT), "3 of 4 tokens differ from the seeded draw's"),
        (dict(p=np.full(4, 0.01)), "too unlikely for temperature 0.7"),
        (dict(broken="token 2 is not allowed by the grammar"), "token 2 is not allowed by the grammar"),
        (dict(text="abce"), "the text is not what the tokens spell"),
    ],
)
def test_a_sampled_answer_that_differs_fails(changes, reason):
    verdict = judged(**changes)
    assert not verdict.ok and reason in verdict.reason


def test_a_greedy_answer_must_take_the_top_token_up_to_near_ties():
    near = judged(GREEDY, pick=np.array([10, 99, 12, 13]), gap=np.array([0, 0.4, 0, 0]))
    assert near.ok and near.flips == 1
    far = judged(GREEDY, pick=np.array([10, 99, 12, 13]), gap=np.array([0, 2.5, 0, 0]))
    assert not far.ok and far.reason == "token 1 is not the most likely one (by 2.50) in a greedy answer"


def test_the_finish_reason_and_the_count_must_be_true():
    assert "3 completion tokens billed" in judged(tokens=3).reason
    assert "finish 'length' after 4 of max_tokens 8" in judged(dataclasses.replace(SAMPLED, max_tokens=8)).reason
    assert "without an end-of-generation token" in judged(finish=FINISH_STOP).reason
    cut = judged(dataclasses.replace(SAMPLED, stop=("c",)), finish=FINISH_STOP, said="ab")
    assert cut.ok
    assert "cut at the stop string" in judged(dataclasses.replace(SAMPLED, stop=("c",)), finish=FINISH_STOP).reason
    assert judged(finish=FINISH_STOP, tokens=3, ends_on_eog=True, said="abc", text="abc").ok  # 3 tokens + EOG
    assert "not a finished answer" in judged(finish="cancelled").reason


# ------------------------------------------------------------------ the real model


def report(capsys, line: str) -> None:
    """A tally for the terminal even when the test passes (pytest captures plain prints)."""
    with capsys.disabled():
        print(f"\n[verification] {line}", flush=True)


@slow
async def test_where_the_probe_says_exact_every_logit_matches_and_the_budget_is_kept(default_model_file):
    """Where the engine's probe found batched and single decoding bit-identical (``numerics``), a verifier
    with the same numerics sees exactly the worker's logits at every position (f16 rounding aside): here a
    one-thread worker, a two-thread verifier, a prompt over one 512-token batch, and an answer whose last
    verification batch holds a single token. A two-thread worker claims no exact numerics: ggml splits a
    single token's attention among threads once the cache view reaches 512 cells."""
    async with (
        open_engine(default_model_file, slots=1, threads=1) as worker,
        open_engine(default_model_file, slots=1, threads=2) as verifier,
    ):
        with trio.fail_after(300):
            assert verifier.numerics == "cpu" and worker.batch_numerics == verifier.batch_numerics  # one machine
            messages, params = job(0, long_every=25)  # greedy, with the long system document
            params = replace(params, max_tokens=2 * PROBE_TOKENS + 2, stop=())
            done = await answer(worker, messages, params)
            records, tokens = divmod(len(done.fingerprints), fingerprints.RECORD_BYTES)
            assert tokens == 0 and done.usage.completion_tokens <= records <= done.usage.completion_tokens + 1
            verdict = await check(verifier, messages, params, done, worker)
            assert verdict.ok, verdict
            if worker.batch_numerics:
                assert verdict.max_error == 0.0 and verdict.flips == 0
            with pytest.raises(InvalidRequest, match="not a multiple of 15"):
                await check(verifier, messages, params, replace(done, fingerprints=done.fingerprints[:-1]))


@slow
@pytest.mark.long  # the per-slot engine is not the default; the default (batched) one's test below stays
async def test_honest_work_is_never_flagged(default_model_file, tmp_path, capsys):
    """40 honest checks (tests/calibration.py: 1- and 2-thread workers, either slot, alone or beside another
    job, warm and cold caches, 1- and 2-thread verifiers, a Q2_K round whose batched pass is not bit-identical):
    none flagged. ``bench/verify.py --calibrate`` runs the same workload at 1,000 checks."""
    with trio.fail_after(900):
        tally = await calibration.honest_checks(default_model_file, tmp_path, pairs=4, singles=4)
    report(capsys, tally.summary())
    assert not tally.failures, tally.failures[:5]
    assert len(tally.verdicts) == 40


@slow
async def test_honest_batched_work_is_never_flagged(default_model_file, capsys):
    """16 honest answers of the batched engine, four at a time joining a quarter of a second apart, every fifth
    with the long system document (found in a cache after the first): none flagged. The calibration runs 160."""
    with trio.fail_after(900):
        tally = await calibration.batched_checks(default_model_file, rounds=4)
    report(capsys, tally.summary())
    assert not tally.failures, tally.failures[:5]
    assert len(tally.verdicts) == 16 and tally.reused_tokens > 3 * 500  # the long document was not computed again


@slow
@pytest.mark.long  # the noisy regime is not the default worker's
async def test_honest_noisy_work_is_never_flagged(default_model_file, capsys):
    """8 honest answers of up to 96 tokens from a worker whose logits carry Gaussian noise at every position (as
    a GPU's might) and that claims no numerics, so it is checked in the widest class: none flagged. The
    calibration runs 200."""
    with trio.fail_after(900):
        tally = await calibration.noisy_checks(default_model_file, jobs=8)
    report(capsys, tally.summary())
    assert not tally.failures, tally.failures[:5]
    assert len(tally.verdicts) == 8 and {v.regime for v in tally.verdicts} == {"gpu"}


#: The cheaters the default suite runs, one per kind of check (a logit off, the seeded draw, padding a default
#: worker's answer); the others run with ``scripts/test --all`` (CI), as marked.
IN_DEFAULT_SUITE = {"Q4_0", "hotter", "pad-past-eog-exact"}


@slow
@pytest.mark.parametrize(
    "cheat", [c if c in IN_DEFAULT_SUITE else pytest.param(c, marks=pytest.mark.long) for c in calibration.CHEATS]
)
async def test_every_cheater_is_caught(cheat, default_model_file, tmp_path, capsys):
    """4 checked jobs of at least 32 tokens (64 for the noisy-regime cheaters and the padder) from each cheater
    of tests/cheaters.py, served by the default (batched) engine: every one must fail verification. The
    calibration runs 100 per cheater."""
    with trio.fail_after(900):
        tally = await calibration.cheater_checks(cheat, default_model_file, tmp_path, jobs=4)
    report(capsys, tally.summary())
    assert tally.checked == 4 and tally.caught == 4, tally.passed


@slow
async def test_through_the_market_the_receipt_commits_to_the_fingerprints_and_a_cheat_is_caught(
    default_model_file, tmp_path
):
    """Real workers on libp2p: the requester gets the fingerprints in JobDone, the signed receipt commits to
    them, and a requester's self-check passes the honest worker and catches one with a hidden prompt."""
    from node.market.jobs import check_result_receipt
    from node.market.requester import JobSpec, run_job
    from node.market.routing import Reputation, RouteQuery
    from node.verify.local import LocalVerifier
    from tests.factories import MODEL, requester, worker

    messages = [{"role": "user", "content": "Write a detailed paragraph about how bread rises."}]
    spec = JobSpec(model=MODEL, params=SamplingParams(max_tokens=40, temperature=0.8), messages=messages)
    async with (
        open_engine(default_model_file, slots=1, threads=1) as engine,
        open_engine(default_model_file, slots=1, threads=1) as own,
    ):
        verifier = LocalVerifier({MODEL: own})
        with trio.fail_after(180):
            for kind, served in (("honest", engine), ("cheat", cheaters.HiddenPrompt(engine))):
                async with worker(tmp_path, kind, served) as (_, offer, _), requester(tmp_path) as host:
                    result = await run_job(host, lambda offer=offer: [offer], RouteQuery(MODEL, free_only=True),
                                           spec, reputation=Reputation())  # fmt: skip
                proof = result.proof
                assert proof.worker == offer.peer_id and proof.request.params["seed"] is not None  # always seeded
                done = proof.done
                assert len(done.fingerprints) >= 15 * result.completion_tokens
                assert check_result_receipt(done.receipt, proof.request, proof.text, done.fingerprints) is None
                forged = done.fingerprints[:-15] + bytes(15)
                assert check_result_receipt(done.receipt, proof.request, proof.text, forged) == (
                    "receipt does not match the fingerprints received"
                )
                verdict = await verifier.check_result(result)
                assert verdict.ok == (kind == "honest"), verdict
