"""Property-based tests (hypothesis): random recipes, dataset rows and API bodies either pass or get rayft's own
error (ConfigError / DataError in one report, an API error with a 4xx status), never a traceback of another kind.

Bounded: each property tries a fixed number of examples with a fixed seed (derandomised), so a run costs the same
seconds every time and a failure reproduces.
"""

import json
import math

import pytest
from conftest import DEMO_RECIPE, ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rayft.data.errors import DataError
from rayft.data.pipeline import load_examples
from rayft.orchestrator.openai_api import ApiError, Limits, Sampling, chat_request, completion_request, parse_body
from rayft.orchestrator.plan import make_plan
from rayft.recipe.loading import load_recipe
from rayft.recipe.parse import parse_config
from rayft.recipe.plan import Node
from rayft.recipe.problems import ConfigError
from rayft.recipe.schema import key_sections

pytestmark = pytest.mark.unit

BOUNDED = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
KEYS = sorted(key_sections())
NODES = [Node(node_id="local", ip="127.0.0.1", resources={"CPU": 2.0, "memory": 16e9})]

# Unicode that has broken text handling elsewhere: a lone surrogate, NUL, right-to-left marks, combining marks,
# astral characters, and the separators JSON and YAML treat specially
AWKWARD = st.sampled_from(["\ud800", "\udfff", "\x00", "\u202e", "\u200f", "e\u0301", "\U0001f600", "\u2028",
                           "\ufeff", "${oc.env:HOME}", "~", "{", "[", ":", "#", "'", '"', "\\"])
TEXT = st.lists(st.one_of(st.text(max_size=8), AWKWARD), max_size=4).map("".join)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
                    st.floats(allow_nan=True, allow_infinity=True), TEXT)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(TEXT, inner, max_size=3)), max_leaves=6)


def plans_or_refuses(raw: dict) -> None:
    """What `rayft plan` does before Ray: parse and check the recipe, then plan it on a 2-CPU node."""
    try:
        cfg = parse_config(raw, base_dir=ROOT)
        make_plan(cfg, NODES, num_train_examples=256)
    except (ConfigError, DataError) as err:
        assert str(err).strip()


@BOUNDED
@given(st.dictionaries(st.one_of(st.sampled_from(KEYS), TEXT), VALUES, max_size=5))
def test_a_recipe_of_random_keys_and_values_plans_or_is_refused(extra):
    plans_or_refuses({**load_recipe(DEMO_RECIPE, []), **extra})


@BOUNDED
@given(st.lists(st.tuples(st.sampled_from(KEYS), TEXT), min_size=1, max_size=3))
def test_command_line_overrides_of_random_text_plan_or_are_refused(overrides):
    try:
        raw = load_recipe(DEMO_RECIPE, [f"{key}={value}" for key, value in overrides])
    except ConfigError as err:
        assert str(err).strip()
        return
    plans_or_refuses(raw)


ROW_VALUES = st.recursive(st.one_of(TEXT, st.integers(), st.floats(), st.none(), st.booleans()),
                          lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                  st.dictionaries(TEXT, inner, max_size=3)), max_leaves=5)
ROWS = st.lists(st.one_of(
    st.fixed_dictionaries({"instruction": ROW_VALUES, "output": ROW_VALUES}, optional={"input": ROW_VALUES}),
    st.dictionaries(TEXT, ROW_VALUES, max_size=3),
    st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"")),  # a line of raw bytes
), min_size=1, max_size=6)


@BOUNDED
@given(ROWS)
def test_dataset_rows_of_random_unicode_nesting_and_bytes_load_or_are_refused(tmp_path, rows):
    lines = [row if isinstance(row, bytes) else json.dumps(row).encode() for row in rows]
    (tmp_path / "random.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "dataset_info.json").write_text(json.dumps({"random": {"file_name": "random.jsonl"}}))
    try:
        examples = load_examples("random", str(tmp_path), None, max_bad_ratio=1.0)
    except DataError as err:
        assert "\n" not in str(err).strip()
        return
    assert len(examples) <= len(rows)


LIMITS = Limits(max_tokens=64, max_prompt_tokens=256, max_body_bytes=65536)
DEFAULTS = Sampling(do_sample=False, temperature=1.0, top_p=1.0, top_k=50, repetition_penalty=1.0,
                    max_new_tokens=16)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", "developer", "x"]),
                                 "content": st.one_of(TEXT, VALUES)})
CHAT = st.fixed_dictionaries({"model": TEXT, "messages": st.lists(MESSAGE, max_size=3)},
                             optional={"temperature": SCALARS, "top_p": SCALARS, "max_tokens": SCALARS,
                                       "n": SCALARS, "stop": VALUES, "seed": SCALARS, "stream": SCALARS,
                                       "tools": VALUES, "tool_choice": VALUES, "stream_options": VALUES})
COMPLETION = st.fixed_dictionaries({"model": TEXT, "prompt": st.one_of(TEXT, VALUES)},
                                   optional={"max_tokens": SCALARS, "echo": SCALARS, "stop": VALUES})


def mutated(body: dict, mutation: tuple) -> bytes:
    """The body with one field replaced, removed or added, as JSON bytes (non-finite floats as JSON allows)."""
    kind, key, value = mutation
    body = dict(body)
    if kind == "drop" and body:
        body.pop(sorted(body)[key % len(body)])
    elif kind == "set":
        body[sorted(body)[key % len(body)] if body else "model"] = value
    return json.dumps(body).encode()


MUTATION = st.tuples(st.sampled_from(["none", "drop", "set"]), st.integers(0, 9), VALUES)


@BOUNDED
@given(st.one_of(CHAT.map(lambda b: (chat_request, b)), COMPLETION.map(lambda b: (completion_request, b))), MUTATION)
def test_api_bodies_of_the_openai_shape_mutated_are_taken_or_get_a_4xx(request, mutation):
    parse, body = request
    try:
        checked = parse(parse_body(mutated(body, mutation), LIMITS), DEFAULTS, LIMITS)
    except ApiError as err:
        assert 400 <= err.status < 500 and err.message
        return
    sampling = checked.sampling
    assert 0 < sampling.max_new_tokens <= LIMITS.max_tokens and math.isfinite(sampling.temperature)
