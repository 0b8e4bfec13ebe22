"""Scores from a reward model behind an HTTP endpoint (`reward_model_type: api`), with a timeout, retries
with exponential backoff, and a clear error when the endpoint stays down.

The request follows LLaMA-Factory's: POST {"model": "model", "messages": [text, ...]} as JSON, answered
with {"scores": [float, ...]}, one score per text in order.
"""

import json
import time
import urllib.error
import urllib.request


class RewardAPIError(RuntimeError):
    """The reward endpoint gave no usable answer; the message names it and the last error."""


def api_scores(url: str, texts: list[str], timeout: float = 30.0, retries: int = 3, backoff: float = 1.0,
               sleep=time.sleep) -> list[float]:
    """One score per text from the endpoint at `url`; retried `retries` times after the first try, waiting
    backoff, 2 x backoff, ... seconds between tries. A malformed answer is not retried."""
    body = json.dumps({"model": "model", "messages": texts}).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    last_error = None
    for attempt in range(retries + 1):
        if attempt:
            sleep(backoff * 2 ** (attempt - 1))
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                answer = json.loads(response.read())
            break
        except urllib.error.HTTPError as err:
            last_error = f"HTTP {err.code}"
            if err.code < 500:  # the request is wrong; asking again will not help
                raise RewardAPIError(f"reward_model: the reward API at {url} refused the request ({last_error})") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
            last_error = str(getattr(err, "reason", err))
    else:
        raise RewardAPIError(f"reward_model: the reward API at {url} did not answer after {retries + 1} tries "
                             f"(timeout {timeout:g} s each; last error: {last_error}); check that it is running")
    scores = answer.get("scores") if isinstance(answer, dict) else None
    if not isinstance(scores, list) or len(scores) != len(texts) or not all(isinstance(s, (int, float)) for s in scores):
        raise RewardAPIError(f"reward_model: the reward API at {url} must answer {{\"scores\": [one number per text]}} "
                             f"for {len(texts)} texts; it answered {str(answer)[:200]}")
    return [float(s) for s in scores]
