"""bench/txt2img_vs_diffusers.py's two prompt -> image calls, on the tiny SD-1 release of
tests/toy.py: ldm_jax's (on the imported run) and diffusers' StableDiffusionPipeline (on our
diffusers export of that run) give the same images from the same initial latents. Marked
slow: an import, an export and both pipelines, about 20 s warm on 2 cores."""

import importlib.util
import pathlib

import numpy as np
import pytest
from toy import write_tiny_sd1

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bench():
    path = ROOT / "bench" / "txt2img_vs_diffusers.py"
    spec = importlib.util.spec_from_file_location("txt2img_vs_diffusers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_txt2img_calls_agree(tmp_path):
    pytest.importorskip("diffusers")
    from ldm_jax import export, import_sd

    bench = _bench()
    path, yaml_path, _ = write_tiny_sd1(tmp_path)
    run, folder = tmp_path / "run", tmp_path / "diffusers"
    import_sd.main([f"--checkpoint={path}", f"--original_config={yaml_path}",
                    f"--workdir={run}", "--image_size=32"])  # fmt: skip
    export.main([f"--workdir={run}", "--layout=diffusers", f"--out={folder}"])
    latents = np.random.default_rng(0).standard_normal((1, 16, 16, 4), dtype=np.float32)
    results = []
    for make, source in ((bench.ldm_jax_txt2img, run), (bench.diffusers_txt2img, folder)):
        pixels, image = make(source, 3, bench.GUIDANCE, latents)(bench.PROMPT)
        assert pixels.dtype == np.uint8 and pixels.shape == (1, 32, 32, 3)
        assert np.array_equal(pixels, np.round(image * 255).astype(np.uint8))
        results.append(image)
    check = bench.compare(*results)
    assert check["unsaturated"] > 0.5 and np.std(results[1]) > 0.01
    assert check["max_abs_diff"] < 1e-4, check
