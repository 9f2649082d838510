"""Layouts as tokens (ldm_jax.data.layouts): the encoding in closed form, the round trip
within half a grid cell, padding and truncation, the user's --layout text and JSON, the
dataset boxes; and the layout conditioner (ldm_jax.training.conditioner) on top of it."""

import json

import jax
import ml_collections
import numpy as np
import pytest

from ldm_jax.data import layouts
from ldm_jax.data.layouts import Layout, TokenLayout
from ldm_jax.errors import UserError

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _random_layout(rng, n: int, n_classes: int) -> Layout:
    xs = np.sort(rng.uniform(0, 1, (n, 2)), axis=1)
    ys = np.sort(rng.uniform(0, 1, (n, 2)), axis=1)
    boxes = np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=1).astype(np.float32)
    return Layout(rng.integers(0, n_classes, n), boxes)


def _one_line_user_error(call):
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert message and "\n" not in message, message
    return message


# ------------------------------------------------------------------------- the tokens


@pytest.mark.parametrize("vocab, grid", [(8192, 90), (101, 10)])
def test_round_trip_within_half_a_cell(vocab, grid):
    scheme = TokenLayout(vocab, max_objects=6)
    assert scheme.grid == grid and scheme.pad == vocab - 1 and scheme.length == 18
    half = 0.5 / (grid - 1)
    rng = np.random.default_rng(vocab)
    worst = 0.0
    for draw in range(200):
        layout = _random_layout(rng, draw % 7, n_classes=10)  # 0..max_objects objects
        tokens, dropped = scheme.encode(layout)
        assert dropped == 0
        assert tokens.dtype == np.int32 and tokens.shape == (scheme.length,)
        assert tokens.min() >= 0 and tokens.max() <= scheme.pad
        back = scheme.decode(tokens)
        np.testing.assert_array_equal(back.labels, layout.labels)
        assert back.boxes.shape == layout.boxes.shape and back.boxes.dtype == np.float32
        if len(layout):
            err = np.abs(back.boxes.astype(np.float64) - layout.boxes).max()
            assert err <= half + 1e-6
            worst = max(worst, err)
            # a decoded corner is a grid point
            np.testing.assert_allclose(
                back.boxes * (grid - 1), np.rint(back.boxes * (grid - 1)), atol=1e-4
            )
    assert worst > 0.95 * half  # the bound is tight: some coordinate lands near a cell edge


def test_tokens_by_hand():
    scheme = TokenLayout(101, max_objects=3)  # G = 10, PAD = 100
    layout = Layout(
        np.array([3, 7]),
        np.array([[0.0, 0.0, 1.0, 1.0], [0.25, 0.6, 0.75, 0.9]], np.float32),
    )
    tokens, dropped = scheme.encode(layout)
    # (0, 0) -> 0 * 10 + 0; (1, 1) -> 9 * 10 + 9; (0.25, 0.6) -> x 2.25 -> 2, y 5.4 -> 5
    # -> 52; (0.75, 0.9) -> x 6.75 -> 7, y 8.1 -> 8 -> 87
    assert tokens.tolist() == [3, 0, 99, 7, 52, 87, 100, 100, 100] and dropped == 0
    assert scheme.corner(1.0, 0.0) == 9 and scheme.corner(0.0, 1.0) == 90
    big = TokenLayout(8192, max_objects=1)  # G = 90, PAD = 8191
    tokens, _ = big.encode(Layout(np.array([5]), np.array([[0, 0, 1, 1]], np.float32)))
    assert tokens.tolist() == [5, 0, 89 * 90 + 89]
    assert big.encode(Layout.empty())[0].tolist() == [8191] * 3


def test_padding_and_truncation():
    scheme = TokenLayout(8192, max_objects=4)
    empty, dropped = scheme.encode(Layout.empty())
    assert empty.shape == (12,) and (empty == scheme.pad).all() and dropped == 0
    assert len(scheme.decode(empty)) == 0 and scheme.decode(empty).boxes.shape == (0, 4)

    rng = np.random.default_rng(0)
    two = _random_layout(rng, 2, 10)
    tokens, _ = scheme.encode(two)
    assert (tokens[6:] == scheme.pad).all() and (tokens[:6] != scheme.pad).all()

    six = _random_layout(rng, 6, 10)
    tokens, dropped = scheme.encode(six)
    assert dropped == 2 and tokens.shape == (12,)
    first_four = Layout(six.labels[:4], six.boxes[:4])
    np.testing.assert_array_equal(tokens, scheme.encode(first_four)[0])
    np.testing.assert_array_equal(scheme.decode(tokens).labels, six.labels[:4])


def test_scheme_check():
    TokenLayout(8192, 4).check(182)
    with pytest.raises(UserError):
        TokenLayout(4, 4).check(2)  # a 1 x 1 grid names no box
    with pytest.raises(UserError):
        TokenLayout(101, 4).check(101)  # class 100 would be the pad token


# ------------------------------------------------------------------ the user's layouts


def test_parse_text():
    layout = layouts.parse_text("3:0.1,0.1,0.4,0.5; 7:0,0.2,1,0.9", 10)
    np.testing.assert_array_equal(layout.labels, [3, 7])
    np.testing.assert_allclose(layout.boxes, [[0.1, 0.1, 0.4, 0.5], [0, 0.2, 1, 0.9]])
    assert layout.boxes.dtype == np.float32
    named = layouts.parse_text("three:0.1,0.1,0.4,0.5;seven:0,0.2,1,0.9;", 10, NAMES)
    np.testing.assert_array_equal(named.labels, [3, 7])
    np.testing.assert_array_equal(named.boxes, layout.boxes)
    assert len(layouts.parse_text("", 10)) == 0
    assert layouts.parse_text("", 10).boxes.shape == (0, 4)


@pytest.mark.parametrize(
    "text",
    [
        "3:0.4,0.1,0.1,0.5",  # x0 > x1
        "3:0.1,0.5,0.4,0.5",  # y0 == y1
        "3:0.1,0.1,1.2,0.5",  # outside [0, 1]
        "3:-0.1,0.1,0.4,0.5",
        "10:0.1,0.1,0.4,0.5",  # label out of range
        "-1:0.1,0.1,0.4,0.5",
        "3 0.1,0.1,0.4,0.5",  # no ':'
        "3:0.1,0.1,0.4",  # three coordinates
        "3:0.1,0.1,0.4,x",
        "ten:0.1,0.1,0.4,0.5",  # not a class name
    ],
)
def test_parse_text_refuses(text):
    _one_line_user_error(lambda: layouts.parse_text(text, 10, NAMES))


def test_json(tmp_path):
    a = layouts.parse_text("3:0.1,0.1,0.4,0.5;7:0,0.2,1,0.9", 10)
    b = layouts.parse_text("1:0.5,0.5,0.75,0.8", 10)
    many = tmp_path / "many.json"
    many.write_text(json.dumps([layouts.to_json(a, NAMES), layouts.to_json(b)]))
    assert layouts.to_json(b) == [{"label": 1, "box": [0.5, 0.5, 0.75, 0.8]}]
    assert layouts.to_json(a, NAMES)[0]["label"] == "three"
    got = layouts.read_json(many, 10, NAMES)
    assert len(got) == 2
    for want, have in zip((a, b), got):
        np.testing.assert_array_equal(have.labels, want.labels)
        np.testing.assert_allclose(have.boxes, want.boxes, atol=1e-4)

    one = tmp_path / "one.json"  # one layout alone
    one.write_text(json.dumps(layouts.to_json(a)))
    (got,) = layouts.read_json(one, 10)
    np.testing.assert_array_equal(got.labels, a.labels)

    # parse: a .json path or one layout as text
    assert len(layouts.parse(str(many), 10, NAMES)) == 2
    (text,) = layouts.parse("3:0.1,0.1,0.4,0.5", 10)
    assert isinstance(text, Layout) and text.labels.tolist() == [3]


@pytest.mark.parametrize(
    "content",
    [
        "[{'label': 3}",  # not JSON
        '[[{"label": 3, "box": [0.1, 0.1, 0.4]}]]',  # three coordinates
        '[{"label": 3, "box": [0.1, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]}]',  # eight
        '[[{"box": [0.1, 0.1, 0.4, 0.5]}]]',  # no label
        '[[{"label": 3, "box": [0.4, 0.1, 0.1, 0.5]}]]',  # bad box order
        '[[{"label": 12, "box": [0.1, 0.1, 0.4, 0.5]}]]',  # label out of range
        '{"label": 3, "box": [0.1, 0.1, 0.4, 0.5]}',  # an object, not a list of them
        "3",
        "null",
    ],
)
def test_read_json_refuses(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    message = _one_line_user_error(lambda: layouts.read_json(path, 10))
    assert str(path) in message
    _one_line_user_error(lambda: layouts.parse(str(path), 10))
    _one_line_user_error(lambda: layouts.read_json(tmp_path / "missing.json", 10))


def test_from_example():
    yxyx = [[0.1, 0.2, 0.5, 0.6], [0.0, 0.3, 1.0, 0.4]]  # TFDS BBoxFeature order
    layout = layouts.from_example([4, 2], yxyx, "yxyx")
    np.testing.assert_allclose(layout.boxes, [[0.2, 0.1, 0.6, 0.5], [0.3, 0.0, 0.4, 1.0]])
    assert layout.labels.tolist() == [4, 2] and layout.boxes.dtype == np.float32
    same = layouts.from_example(np.array([4, 2]), layout.boxes, "xyxy")
    np.testing.assert_array_equal(same.boxes, layout.boxes)
    assert len(layouts.from_example([], np.zeros((0, 4)), "xyxy")) == 0
    _one_line_user_error(lambda: layouts.from_example([4], [[0, 0, 1, 1]], "cxcywh"))


# ----------------------------------------------------------------------- conditioner


@pytest.fixture(scope="module")
def conditioner():
    from ldm_jax.training.conditioner import Conditioner

    cfg = ml_collections.ConfigDict(
        dict(
            kind="layout",
            n_classes=10,
            class_names=tuple("0123456789"),
            vocab_size=8192,
            max_objects=4,
            embed_dim=32,
            n_layer=1,
            max_length=12,
            heads=2,
            dim_head=16,
            drop_rate=0.1,
        )
    )
    return Conditioner(cfg, "crossattn")


def test_conditioner_tokens(conditioner):
    scheme = TokenLayout(8192, 4)
    assert conditioner.per_example and conditioner.trainable and conditioner.context_dim == 32
    null = conditioner.null_inputs(2)
    assert set(null) == {"tokens"} and null["tokens"].shape == (2, 12)
    assert null["tokens"].dtype == np.int32 and (null["tokens"] == scheme.pad).all()

    layout = conditioner.parse("3:0.1,0.1,0.4,0.5")
    assert isinstance(layout, Layout) and layout.labels.tolist() == [3]
    np.testing.assert_allclose(layout.boxes, [[0.1, 0.1, 0.4, 0.5]])
    got = conditioner.inputs([layout])
    np.testing.assert_array_equal(got["tokens"], scheme.encode(layout)[0][None])
    with pytest.raises(UserError):
        conditioner.parse("3:0.4,0.1,0.1,0.5")

    five = _random_layout(np.random.default_rng(1), 5, 10)  # one past max_objects
    np.testing.assert_array_equal(conditioner.inputs([five])["tokens"][0], scheme.encode(five)[0])


def test_conditioner_embed_and_drop(conditioner):
    layout = layouts.parse_text("3:0.1,0.1,0.4,0.5;7:0.5,0.2,0.9,0.9", 10)
    inputs = conditioner.inputs([layout, Layout.empty()])
    params = conditioner.init(jax.random.PRNGKey(0))
    context, y = conditioner.embed(params, {}, inputs)
    assert y is None
    context = np.asarray(context)
    assert context.shape == (2, 12, 32) and context.dtype == np.float32
    # the empty layout (all padding) is the unconditional input: finite, and its own
    assert np.isfinite(context).all()
    null_context = np.asarray(conditioner.embed(params, {}, conditioner.null_inputs(1))[0])
    np.testing.assert_allclose(context[1], null_context[0], atol=1e-5)
    assert np.abs(context[0] - context[1]).max() > 1e-3  # the layout changes the context

    dropped = conditioner.drop(inputs, jax.random.PRNGKey(1), 1.0)
    np.testing.assert_array_equal(
        np.asarray(dropped["tokens"]), conditioner.null_inputs(2)["tokens"]
    )
    kept = conditioner.drop(inputs, jax.random.PRNGKey(1), 0.0)
    np.testing.assert_array_equal(np.asarray(kept["tokens"]), inputs["tokens"])
