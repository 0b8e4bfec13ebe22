"""PPO's arithmetic against hand-computed values, and the reward API client against local HTTP servers."""

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from rayft.trainers import rl
from rayft.trainers.rewards import RewardAPIError, api_scores

pytestmark = pytest.mark.unit


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_gae_runs_backwards_over_each_response():
    # δ2 = 1 - 0.7 = 0.3; δ1 = 0.7 - 0.6 = 0.1, A1 = 0.1 + 0.95·0.3; δ0 = 0.6 - 0.5, A0 = 0.1 + 0.95·A1
    advantages, returns = rl.gae(t([0, 0, 1]), t([0.5, 0.6, 0.7]), t([1, 1, 1]), gamma=1.0, lam=0.95)
    assert advantages[0].tolist() == pytest.approx([0.46575, 0.385, 0.3])
    assert returns[0].tolist() == pytest.approx([0.96575, 0.985, 1.0])
    # past the response's end nothing counts, not even the value there
    advantages, returns = rl.gae(t([0, 1, 0]), t([0.5, 0.6, 9.0]), t([1, 1, 0]), gamma=1.0, lam=0.95)
    assert advantages[0].tolist() == pytest.approx([0.48, 0.4, 0.0]) and returns[0, 2] == 0
    # discounting: with values 0 and λ = 1 the advantage is the discounted reward to go
    advantages, _ = rl.gae(t([0, 0, 1]), t([0, 0, 0]), t([1, 1, 1]), gamma=0.9, lam=1.0)
    assert advantages[0].tolist() == pytest.approx([0.81, 0.9, 1.0])


def test_clipped_policy_loss_takes_the_pessimistic_term():
    old = t([0.0, 0.0, 0.0])
    new = t([math.log(1.5), math.log(0.5), math.log(1.5)])  # ratios 1.5, 0.5, 1.5
    advantages = t([1.0, 1.0, -1.0])
    loss, clipped = rl.clipped_policy_loss(new, old, advantages, t([1, 1, 1]), clip_range=0.2)
    # -min(1.5, 1.2) = -1.2 (clipped); -min(0.5, 0.8) = -0.5; -(-1)·1.5 = 1.5 beats 1.2
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5) / 3) and clipped.item() == pytest.approx(1 / 3)
    loss, _ = rl.clipped_policy_loss(new, old, advantages, t([1, 1, 0]), clip_range=0.2)
    assert loss.item() == pytest.approx((-1.2 - 0.5) / 2)


def test_clipped_value_loss():
    # the clipped value 0.5 + 0.2 is further from the return 2.0 than 1.0 is: (0.7 - 2)² / 2
    assert rl.clipped_value_loss(t([1.0]), t([0.5]), t([2.0]), t([1]), clip_range=0.2).item() == pytest.approx(0.845)
    assert rl.clipped_value_loss(t([1.9]), t([1.8]), t([2.0]), t([1]), clip_range=0.2).item() == pytest.approx(0.005)


def test_rewards_are_the_score_on_the_last_token_minus_the_kl_penalty():
    rewards, kl = rl.kl_penalised_rewards(t(2.0), t([-1.0, -2.0]), t([-1.5, -1.0]), t([1, 1]), kl_coef=0.1)
    assert rewards[0].tolist() == pytest.approx([-0.05, 2.1]) and kl.tolist() == pytest.approx([-0.5])
    rewards, kl = rl.kl_penalised_rewards(t(2.0), t([-1.0, -2.0]), t([-1.5, -1.0]), t([1, 0]), kl_coef=0.1)
    assert rewards[0].tolist() == pytest.approx([1.95, 0.0]) and kl.tolist() == pytest.approx([0.5])


def test_whiten_and_the_kl_controllers():
    assert rl.whiten(t([1, 2, 3]), t([1, 1, 1]))[0].tolist() == pytest.approx([-1.2247449, 0, 1.2247449], abs=1e-6)
    control = rl.AdaptiveKLController(value=0.2, target=6.0, horizon=10_000)
    assert control.update(9.0, 1000) == pytest.approx(0.2 * 1.02)  # error 0.5, clipped to 0.2, x 1000/10000
    assert control.update(3.0, 1000) == pytest.approx(0.2 * 1.02 * 0.98)
    assert control.update(6.6, 10_000) == pytest.approx(0.2 * 1.02 * 0.98 * 1.1)


def test_running_moments_match_the_moments_of_everything_seen():
    moments, seen = rl.RunningMoments(), torch.tensor([1.0, 3.0, 2.0, 10.0, -4.0, 0.5])
    moments.update(seen[:2])
    moments.update(seen[2:])
    assert moments.mean == pytest.approx(seen.mean().item())
    assert moments.std == pytest.approx(seen.std(unbiased=False).item())


class _Endpoint:
    """A reward API on 127.0.0.1 whose behaviour the test sets: score by length, fail, stall or misanswer."""

    def __init__(self, fail_first: int = 0, fail_code: int = 503, stall: float = 0.0, answer=None):
        self.calls, endpoint = 0, self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                endpoint.calls += 1
                texts = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["messages"]
                if endpoint.calls <= fail_first:
                    self.send_response(fail_code)
                    self.end_headers()
                    return
                time.sleep(stall)
                body = json.dumps(answer if answer is not None else {"scores": [len(x) / 10 for x in texts]}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1/score/evaluation"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint(request):
    server = _Endpoint(**getattr(request, "param", {}))
    yield server
    server.close()


def test_scores_come_back_in_order(endpoint):
    assert api_scores(endpoint.url, ["a", "abcde", ""]) == [0.1, 0.5, 0.0]


@pytest.mark.parametrize("endpoint", [{"fail_first": 2}], indirect=True)
def test_a_failing_endpoint_is_retried_with_backoff(endpoint):
    waits = []
    assert api_scores(endpoint.url, ["abc"], retries=3, backoff=0.5, sleep=waits.append) == [0.3]
    assert endpoint.calls == 3 and waits == [0.5, 1.0]


@pytest.mark.parametrize("endpoint", [{"stall": 2.0}], indirect=True)
def test_an_endpoint_that_times_out_is_a_clear_error(endpoint):
    waits = []
    expected = r"did not answer after 2 tries \(timeout 0.3 s each; last error: .*timed out"
    with pytest.raises(RewardAPIError, match=expected):
        api_scores(endpoint.url, ["abc"], timeout=0.3, retries=1, sleep=waits.append)
    assert waits == [1.0]


def test_an_endpoint_that_is_down_is_a_clear_error():
    server = _Endpoint()
    url = server.url
    server.close()
    with pytest.raises(RewardAPIError, match=r"did not answer after 3 tries.*check that it is running"):
        api_scores(url, ["abc"], retries=2, sleep=lambda _: None)


@pytest.mark.parametrize("endpoint", [{"fail_first": 5, "fail_code": 400}], indirect=True)
def test_a_refused_request_is_not_retried(endpoint):
    with pytest.raises(RewardAPIError, match="refused the request \\(HTTP 400\\)"):
        api_scores(endpoint.url, ["abc"], sleep=lambda _: None)
    assert endpoint.calls == 1


@pytest.mark.parametrize("endpoint", [{"answer": {"scores": [1.0, 2.0]}}], indirect=True)
def test_an_answer_of_the_wrong_length_is_refused(endpoint):
    with pytest.raises(RewardAPIError, match="one number per text"):
        api_scores(endpoint.url, ["abc"])
