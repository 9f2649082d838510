"""CLIP text encoder (SD 1.x / 2.x tau_theta): equivalence with transformers' PyTorch
CLIPTextModel on shared random weights, both converters, export round trip, tokenizer ids.

Needs torch (test-only: `pip install torch==2.13.0`) and the CLIP BPE table from
`pip install open-clip-torch --no-deps`; tests skip without them.
"""

import gzip
import importlib.util
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_identical, numpy_state

from ldm_jax.errors import UserError
from ldm_jax.interop.clip_weights import (
    clip_from_hf_config,
    convert_hf_clip,
    convert_open_clip,
    export_hf_clip,
)
from ldm_jax.models import clip, clip_tokenizer
from ldm_jax.models.clip import CLIPTextEncoder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(
    vocab_size=1000,
    hidden_size=64,
    intermediate_size=96,  # not 4 * width: checks that mlp_dim is read from the config
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=16,
    bos_token_id=998,  # CLIP's specials are the last ids; in range for the tiny vocabulary
    eos_token_id=999,
    pad_token_id=999,
)
PREFIX = "cond_stage_model.model."  # where SD 2.x CompVis checkpoints keep OpenCLIP


def _torch_clip(act: str):
    """Tiny transformers CLIPTextModel whose every tensor (LayerNorms too) is random."""
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(**TINY, hidden_act=act)
    model = transformers.CLIPTextModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
        for name, p in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.add_(1.0)  # near-identity LayerNorm scales keep activations O(1)
    return config, model


@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def torch_model(request):
    config, model = _torch_clip(request.param)
    return config, model, numpy_state(model)


def _tokens(batch=2, length=TINY["max_position_embeddings"]):
    rng = np.random.default_rng(1)
    return rng.integers(0, TINY["vocab_size"], (batch, length)).astype(np.int32)


def _apply(module, params, tokens):
    return np.asarray(jax.jit(module.apply)(params, jnp.asarray(tokens)))


def test_matches_transformers_last_and_penultimate(torch_model):
    config, model, state = torch_model
    tokens = _tokens()
    with torch.no_grad():
        out = model(torch.from_numpy(tokens).long(), output_hidden_states=True)
        hidden = out.hidden_states  # embeddings, then each layer's output
        penultimate = model.final_layer_norm(hidden[-2]).numpy()
    assert len(hidden) == TINY["num_hidden_layers"] + 1

    last_module = clip_from_hf_config(config.to_dict())
    got = _apply(last_module, convert_hf_clip(state, last_module), tokens)
    assert got.shape == (2, TINY["max_position_embeddings"], TINY["hidden_size"])
    np.testing.assert_allclose(got, out.last_hidden_state.numpy(), atol=1e-4, rtol=0)

    pen_module = clip_from_hf_config(config.to_dict(), output="penultimate")
    pen_params = convert_hf_clip(state, pen_module)  # the unused last layer is dropped
    assert f"layers_{TINY['num_hidden_layers'] - 1}" not in pen_params["params"]
    np.testing.assert_allclose(_apply(pen_module, pen_params, tokens), penultimate, atol=1e-4)
    # Shorter prompts use the first positions, as HF does.
    short = tokens[:, :5]
    with torch.no_grad():
        want = model(torch.from_numpy(short).long()).last_hidden_state.numpy()
    np.testing.assert_allclose(
        _apply(last_module, convert_hf_clip(state, last_module), short), want, atol=1e-4
    )


def _fuse_open_clip(state: dict, num_layers: int) -> dict:
    """The OpenCLIP layout of a transformers state dict, written independently of clip.py."""
    hf = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {
        "token_embedding.weight": hf["embeddings.token_embedding.weight"],
        "positional_embedding": hf["embeddings.position_embedding.weight"],
        "ln_final.weight": hf["final_layer_norm.weight"],
        "ln_final.bias": hf["final_layer_norm.bias"],
        "text_projection": np.ones((64, 32), np.float32),  # unused by SD
        "logit_scale": np.float32(4.6),
        "visual.conv1.weight": np.ones((8, 3, 2, 2), np.float32),
    }
    renames = {
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "self_attn.out_proj": "attn.out_proj",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
    }
    for i in range(num_layers):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            qkv = [hf[f"{src}self_attn.{p}_proj.{leaf}"] for p in "qkv"]
            out[f"{dst}attn.in_proj_{leaf}"] = np.concatenate(qkv, axis=0)
            for a, b in renames.items():
                out[f"{dst}{b}.{leaf}"] = hf[f"{src}{a}.{leaf}"]
    return {PREFIX + k: v for k, v in out.items()} | {"model.diffusion_model.x": np.zeros(1)}


@pytest.mark.parametrize("output", ["last", "penultimate"])
def test_open_clip_naming_converts_identically(torch_model, output):
    config, _, state = torch_model
    module = clip_from_hf_config(config.to_dict(), output=output)
    open_clip_state = _fuse_open_clip(state, TINY["num_hidden_layers"])
    from_open_clip = convert_open_clip(open_clip_state, module, prefix=PREFIX)
    assert_trees_identical(from_open_clip, convert_hf_clip(state, module), dtype=np.float32)


def test_fused_in_proj_order_is_torch_multihead_attention():
    """The q, k, v order assumed in in_proj_weight is nn.MultiheadAttention's (OpenCLIP)."""
    _, model = _torch_clip("gelu")
    hf_attn = model.encoder.layers[0].self_attn
    c, heads = TINY["hidden_size"], TINY["num_attention_heads"]
    mha = torch.nn.MultiheadAttention(c, heads, batch_first=True)
    with torch.no_grad():
        projs = [getattr(hf_attn, f"{p}_proj") for p in "qkv"]
        mha.in_proj_weight.copy_(torch.cat([p.weight for p in projs]))
        mha.in_proj_bias.copy_(torch.cat([p.bias for p in projs]))
        mha.out_proj.load_state_dict(hf_attn.out_proj.state_dict())
        x = torch.randn(2, 7, c)
        causal = torch.triu(torch.ones(7, 7, dtype=torch.bool), 1)  # True = hidden
        want = mha(x, x, x, attn_mask=causal, need_weights=False)[0]
        mask = torch.zeros(7, 7).masked_fill(causal, float("-inf"))[None, None]
        got = hf_attn(x, attention_mask=mask)[0]
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5)


def test_export_round_trip_is_exact(torch_model):
    config, _, state = torch_model  # transformers 5 state_dict: no "text_model." prefix
    module = clip_from_hf_config(config.to_dict())
    params = convert_hf_clip(state, module)
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(params))
    exported = export_hf_clip(params, prefix="")
    assert exported.keys() == state.keys()
    for name, value in state.items():
        assert exported[name].dtype == np.float32
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    # Files (diffusers text_encoder, SD 1.x CompVis) keep the prefix; both read the same.
    on_disk = export_hf_clip(params)
    assert on_disk.keys() == {"text_model." + k for k in state}
    assert_trees_identical(convert_hf_clip(on_disk, module), params, dtype=np.float32)
    compvis = {"cond_stage_model.transformer." + k: v for k, v in on_disk.items()}
    compvis["model.diffusion_model.out.0.weight"] = np.zeros(4, np.float32)  # not ours
    prefix = "cond_stage_model.transformer.text_model."
    assert_trees_identical(
        convert_hf_clip(compvis, module, prefix=prefix), params, dtype=np.float32
    )
    # A penultimate model exports diffusers' SD 2 layout: one layer fewer, loadable as "last".
    pen = clip_from_hf_config(config.to_dict(), output="penultimate")
    pen_state = export_hf_clip(convert_hf_clip(state, pen), prefix="")
    last_layer = f"encoder.layers.{TINY['num_hidden_layers'] - 1}."
    assert pen_state.keys() == {k for k in state if not k.startswith(last_layer)}
    shorter = clip_from_hf_config({**config.to_dict(), "num_hidden_layers": 2})
    assert_trees_identical(
        convert_hf_clip(pen_state, shorter), convert_hf_clip(state, pen), dtype=np.float32
    )


def test_shape_mismatch_and_bad_names_are_clear_errors(torch_model):
    config, _, state = torch_model
    module = clip_from_hf_config(config.to_dict())
    bad = state | {"encoder.layers.1.mlp.fc1.weight": np.zeros((96, 32), np.float32)}
    with pytest.raises(UserError, match=r"layers\.1\.mlp\.fc1\.weight.*\(96, 32\).*\(96, 64\)"):
        convert_hf_clip(bad, module)
    fused = _fuse_open_clip(state, TINY["num_hidden_layers"])
    in_proj = PREFIX + "transformer.resblocks.0.attn.in_proj_weight"
    with pytest.raises(UserError, match=r"in_proj_weight.*\(64, 64\).*\(192, 64\)"):
        convert_open_clip(fused | {in_proj: np.zeros((64, 64), np.float32)}, module, PREFIX)
    with pytest.raises(UserError, match="beyond the 3 layers"):
        convert_hf_clip(state | {"encoder.layers.3.mlp.fc1.bias": np.zeros(96)}, module)
    with pytest.raises(UserError, match="unexpected tensor 'encoder.layers.0.mlp.fc3.bias'"):
        convert_hf_clip(state | {"encoder.layers.0.mlp.fc3.bias": np.zeros(96)}, module)
    with pytest.raises(UserError, match="lacks 2 parameters"):
        convert_hf_clip({k: v for k, v in state.items() if "final_layer_norm" not in k}, module)
    with pytest.raises(UserError, match="lacks"):
        convert_hf_clip(state, module, prefix="cond_stage_model.transformer.text_model.")


def test_presets_param_counts_and_axes():
    """Full-size presets (shapes only) hold as many parameters as the HF models they mirror."""
    counts = {}
    for preset, hf in [
        ("sd1", dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12)),
        # diffusers' SD 2 text_encoder keeps 23 of OpenCLIP ViT-H's 24 layers.
        (
            "sd2",
            dict(
                hidden_size=1024,
                intermediate_size=4096,
                num_attention_heads=16,
                num_hidden_layers=23,
                hidden_act="gelu",
            ),
        ),
    ]:
        with torch.device("meta"):
            ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**hf))
        module = clip.clip_text_encoder(preset)
        shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 77), jnp.int32))
        counts[preset] = sum(x.size for x in jax.tree.leaves(nn.meta.unbox(shapes)))
        assert counts[preset] == sum(p.numel() for p in ref.parameters()), preset
    assert counts == {"sd1": 123_060_480, "sd2": 340_387_840}
    spec = nn.get_partition_spec(shapes)["params"]
    assert spec["token_embedding"]["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")
    assert spec["layers_0"]["mlp"]["fc1"]["kernel"] == jax.sharding.PartitionSpec("embed", "mlp")


def test_compute_dtype_bf16_close_to_fp32():
    module = CLIPTextEncoder(
        width=64, num_layers=2, num_heads=4, vocab_size=1000, context_length=16
    )
    tokens = _tokens()
    params = module.init(jax.random.PRNGKey(0), jnp.asarray(tokens))
    out32 = _apply(module, params, tokens)
    out16 = jax.jit(module.clone(dtype=jnp.bfloat16).apply)(params, jnp.asarray(tokens))
    assert out16.dtype == jnp.bfloat16
    assert jax.tree.leaves(params)[0].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out16, np.float32), out32, atol=0.1)
    with pytest.raises(ValueError, match="context_length"):
        module.apply(params, jnp.zeros((1, 17), jnp.int32))


# ------------------------------------------------------------------------------ tokenizer

needs_bpe = pytest.mark.skipif(
    importlib.util.find_spec("open_clip") is None,
    reason=f"CLIP BPE table missing: {clip_tokenizer.OPEN_CLIP_INSTALL}",
)
PROMPTS = [
    "a photo of a cat",
    "A photograph of an astronaut riding a horse on the Moon, highly detailed, 8k!!",
    "Don't   stop: it's 2024 -- café, naïve & ünïcödé ✨🐱 <b>bold</b>",
    "hello\tworld\n\nnew line's end",
    "",
]


def _reference_encode(text: str) -> list[int]:
    """CLIP's tokenizer algorithm, re-derived from the paper's definition (no transformers)."""
    import regex

    lines = gzip.open(clip_tokenizer.bpe_file(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    # Bytes that print as themselves keep their character; the rest move past U+00FF.
    keep = [b for b in range(256) if chr(b).isprintable() and not chr(b).isspace()]
    moved = [b for b in range(256) if b not in keep]
    byte_char = {b: chr(b) for b in keep} | {b: chr(256 + n) for n, b in enumerate(moved)}
    alphabet = [byte_char[b] for b in keep + moved]
    vocab = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges]
    ids = {t: i for i, t in enumerate(vocab + ["<|startoftext|>", "<|endoftext|>"])}
    rank = {m: i for i, m in enumerate(merges)}

    def bpe(word: str) -> list[str]:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = [(rank.get(p, len(rank)), i) for i, p in enumerate(zip(parts, parts[1:]))]
            best, _ = min(pairs)
            if best == len(rank):
                break
            pair, merged, i = merges[best], [], 0
            while i < len(parts):
                if tuple(parts[i : i + 2]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    text = " ".join(text.split()).lower()
    pattern = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    out = [ids["<|startoftext|>"]]
    for piece in regex.findall(pattern, text, regex.IGNORECASE):
        out += [ids[t] for t in bpe("".join(byte_char[b] for b in piece.encode("utf-8")))]
    return out + [ids["<|endoftext|>"]]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("clip_bpe")


@needs_bpe
def test_tokenizer_known_ids_and_padding(bpe_dir):
    known = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat", OpenAI CLIP
    for variant, pad in (("sd1", 49407), ("sd2", 0)):
        tok = clip_tokenizer.clip_tokenizer(variant, cache_dir=bpe_dir)
        ids, mask = clip_tokenizer.tokenize_clip(tok, ["a photo of a cat"])
        assert ids.dtype == np.int32 and ids.shape == (1, 77)
        assert ids[0].tolist() == known + [pad] * 70
        assert mask[0].tolist() == [True] * 7 + [False] * 70
    vocab = json.loads((bpe_dir / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408 and vocab["!"] == 0 and vocab["a</w>"] == 320
    assert (bpe_dir / "merges.txt").read_text().startswith("#version: 0.2\n")
    # The cached files also load through transformers' own directory reader.
    from_dir = transformers.CLIPTokenizer.from_pretrained(str(bpe_dir))
    assert from_dir("a photo of a cat")["input_ids"] == known


@needs_bpe
def test_tokenizer_matches_reference_algorithm(bpe_dir):
    tok = clip_tokenizer.clip_tokenizer("sd1", cache_dir=bpe_dir)
    ids, mask = clip_tokenizer.tokenize_clip(tok, PROMPTS)
    for row, m, prompt in zip(ids, mask, PROMPTS):
        want = _reference_encode(prompt)
        assert row[: m.sum()].tolist() == want, prompt
        assert m.sum() == len(want)


@needs_bpe
def test_tokenizer_truncates_explicitly(bpe_dir):
    tok = clip_tokenizer.clip_tokenizer("sd2", cache_dir=bpe_dir)
    long = "a very long prompt about " + "red cats and blue dogs " * 20
    with pytest.warns(UserWarning, match="1 of 2 prompts are longer than 77"):
        ids, mask = clip_tokenizer.tokenize_clip(tok, [long, "short"])
    want = _reference_encode(long)
    # As OpenCLIP: the first 76 tokens, then <|endoftext|> in the last slot.
    assert ids[0].tolist() == want[:76] + [49407] and mask[0].all()
    assert ids[1, :3].tolist() == _reference_encode("short") and (ids[1, 3:] == 0).all()
