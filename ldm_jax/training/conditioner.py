"""tau_theta as the diffusion step sees it: batch -> (context, y), with CFG dropout.

`config.cond.kind` picks the encoder:
  none         unconditional
  class        ClassEmbedder (learned null class) -> context [B, 1, D] (crossattn) or
               label ids for the UNet's own label embedding (conditioning_key 'adm')
  text         BERT WordPiece tokens -> TransformerEncoder trained with the UNet (the paper;
               padded keys hidden unless `cond.attend_padding`, the reference's way)
  text_frozen  BERT WordPiece tokens -> pretrained MiniLM BertEncoder, frozen
  clip         CLIP BPE tokens -> CLIP text encoder (Stable Diffusion's), frozen, its
               architecture in `cond.clip` and its params in `cond.weights` (a
               .safetensors file in ldm_jax naming, e.g. written by ldm_jax.import_sd)
  layout       labelled boxes -> tokens (ldm_jax.data.layouts, no text tokenizer) ->
               TransformerEncoder trained with the UNet (the paper's layout model)
Host side turns labels / captions into arrays (`host_inputs`); device side embeds them.
Classifier-free guidance: during training each example's condition is replaced by the
unconditional one (null class, empty prompt, empty layout) with probability
`cond.drop_rate`.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.data import layouts
from ldm_jax.errors import UserError
from ldm_jax.interop import bert_weights
from ldm_jax.models import conditioning, tokenizers

KINDS = ("none", "class", "text", "text_frozen", "clip", "layout")
TEXT_KINDS = ("text", "text_frozen", "clip")


class Conditioner:
    def __init__(self, cond_cfg, conditioning_key):
        if cond_cfg.kind not in KINDS:
            raise UserError(f"unknown config.cond.kind {cond_cfg.kind!r}; valid: {list(KINDS)}")
        self.cfg, self.kind, self.key = cond_cfg, cond_cfg.kind, conditioning_key
        self.module, self.tokenizer, self._frozen = None, None, None
        self._load_frozen = None  # reads frozen weights on first use (a task built for
        # shapes alone, as an import's check, then never holds a text encoder twice)
        if self.kind == "class":
            self.n_classes = int(cond_cfg.n_classes)
            self.null_class = self.n_classes
            if self.key != "adm":
                self.module = conditioning.ClassEmbedder(self.n_classes, cond_cfg.embed_dim)
        elif self.kind == "text":
            self.tokenizer = tokenizers.bert_tokenizer()
            self.module = conditioning.TransformerEncoder(
                n_embed=cond_cfg.embed_dim,
                n_layer=cond_cfg.n_layer,
                vocab_size=self.tokenizer.vocab_size,
                max_seq_len=cond_cfg.max_length,
            )
        elif self.kind == "text_frozen":
            self.module, self._frozen, self.tokenizer = bert_weights.load_minilm()
        elif self.kind == "clip":
            self.module, self._load_frozen, self.tokenizer = _load_clip(cond_cfg)
        elif self.kind == "layout":
            self.n_classes = int(cond_cfg.n_classes)
            self.class_names = tuple(cond_cfg.get("class_names", ()) or ())
            self.tokens = layouts.TokenLayout(int(cond_cfg.vocab_size), int(cond_cfg.max_objects))
            self.tokens.check(self.n_classes)
            self._truncated = 0
            self.module = conditioning.TransformerEncoder(
                n_embed=cond_cfg.embed_dim,
                n_layer=cond_cfg.n_layer,
                vocab_size=self.tokens.vocab_size,
                max_seq_len=max(int(cond_cfg.max_length), self.tokens.length),
                heads=int(cond_cfg.get("heads", 8)),
                dim_head=int(cond_cfg.get("dim_head", 64)),
            )

    @property
    def is_text(self) -> bool:
        return self.kind in TEXT_KINDS

    @property
    def per_example(self) -> bool:
        """Whether each example has its own condition (a prompt, a layout) rather than
        one of a few classes."""
        return self.is_text or self.kind == "layout"

    @property
    def trainable(self) -> bool:
        return self.kind in ("class", "text", "layout") and self.module is not None

    @property
    def context_dim(self) -> int | None:
        if self.kind == "none" or self.key == "adm":
            return None
        if self.kind == "text_frozen":
            return self.module.hidden_size
        if self.kind == "clip":
            return self.module.width
        return int(self.cfg.embed_dim)

    # ----- host side ---------------------------------------------------------------------
    def inputs(self, conditions) -> dict:
        """Per-example conditions (class ids for class runs, prompts for text runs, None
        each for unconditional runs) -> the numpy arrays the UNet's inputs are made of.
        The one place where labels or prompts become model inputs: training batches,
        sampling, the evaluator and the sample grids all come through here."""
        if self.kind == "class":
            return self.labels_inputs(conditions)
        if self.is_text:
            return self.encode_prompts([str(p) for p in conditions])
        if self.kind == "layout":
            return self.layout_inputs(conditions)
        return {}

    def layout_inputs(self, conditions) -> dict:
        """Layouts (ldm_jax.data.layouts.Layout) -> `tokens` int32 [B, 3 * max_objects]."""
        rows, dropped = [], 0
        for layout in conditions:
            tokens, n = self.tokens.encode(layout)
            rows.append(tokens)
            dropped += n
        if dropped:
            self._truncated += dropped
            if self._truncated == dropped:  # the first time only: a run would flood its log
                logging.warning(
                    "layouts with more than cond.max_objects=%d objects are truncated "
                    "(%d objects dropped in this batch; raise cond.max_objects to keep them).",
                    self.tokens.max_objects, dropped,
                )  # fmt: skip
        return {"tokens": np.stack(rows)}

    def layout_picture(self, tokens, size: int) -> np.ndarray:
        """uint8 [size, size, 3]: the layout a row of tokens names, drawn."""
        from ldm_jax.data import condition_pictures

        layout = self.tokens.decode(np.asarray(tokens))
        return condition_pictures.layout(layout, size, self.n_classes, self.class_names)

    def conditions_of(self, batch: dict) -> list:
        """The per-example conditions of a data batch (its labels or captions)."""
        if self.kind == "class":
            if "label" not in batch:
                raise UserError("config.cond.kind='class' but the dataset yields no labels.")
            return list(np.asarray(batch["label"]))
        if self.is_text:
            if "caption" not in batch:
                raise UserError(
                    f"config.cond.kind={self.kind!r} but the dataset has no captions: set "
                    "--config.data.caption_key to its caption feature (a folder dataset's "
                    "is 'caption')."
                )
            return list(batch["caption"])
        if self.kind == "layout":
            if "layout" not in batch:
                raise UserError(
                    "config.cond.kind='layout' but the dataset yields no objects: set "
                    "data.objects.bbox_key / label_key to its box and label features."
                )
            return list(batch["layout"])
        return [None] * len(next(iter(batch.values())))

    def parse(self, text: str):
        """One condition as a user types it (a class id, a prompt, a layout as
        'LABEL:x0,y0,x1,y1;...') -> `inputs`' form."""
        if self.kind == "layout":
            return layouts.parse_text(text, self.n_classes, self.class_names)
        if self.kind != "class":
            return text
        try:
            label = int(text)
        except ValueError:
            raise UserError(
                f"class label {text!r} is not an integer: give ids in [0, {self.n_classes - 1}]."
            ) from None
        self.labels_inputs([label])  # an out-of-range id fails here, naming the range
        return label

    def host_inputs(self, batch: dict) -> dict:
        """Numpy arrays the device step needs from a data batch."""
        return self.inputs(self.conditions_of(batch)) if self.kind != "none" else {}

    def encode_prompts(self, prompts) -> dict:
        """Token ids and masks; each distinct prompt is tokenized once (captions repeat,
        and tokenizing runs on the training loop's thread)."""
        cache = self.__dict__.setdefault("_token_cache", {})
        new = [p for p in dict.fromkeys(prompts) if p not in cache]
        if new:
            if len(cache) + len(new) > 100_000:
                cache.clear()
            if self.kind == "clip":
                from ldm_jax.models import clip_tokenizer

                ids, mask = clip_tokenizer.tokenize_clip(
                    self.tokenizer, new, self.module.context_length
                )
            else:
                ids, mask = tokenizers.tokenize(self.tokenizer, new, self.cfg.max_length)
            cache.update(zip(new, zip(ids, mask)))
        rows = [cache[p] for p in prompts]
        return {
            "tokens": np.stack([r[0] for r in rows]),
            "token_mask": np.stack([r[1] for r in rows]),
        }

    def labels_inputs(self, labels) -> dict:
        try:
            labels = conditioning.check_class_ids(np.asarray(labels), self.n_classes)
        except ValueError as e:
            raise UserError(f"{e}; give class ids in [0, {self.n_classes - 1}].") from None
        return {"label": np.asarray(labels, np.int32)}

    def null_inputs(self, batch_size: int) -> dict:
        if self.kind == "class":
            return {"label": np.full((batch_size,), self.null_class, np.int32)}
        if self.is_text:
            return self.encode_prompts([""] * batch_size)
        if self.kind == "layout":
            return self.layout_inputs([layouts.Layout.empty()] * batch_size)
        return {}

    # ----- device side -------------------------------------------------------------------
    def init(self, rng):
        if not self.trainable:
            return {}
        if self.kind == "class":
            return self.module.init(rng, jnp.zeros((1,), jnp.int32))["params"]
        if self.kind == "layout":
            params = self.module.init(rng, jnp.zeros((1, self.tokens.length), jnp.int32))
            return self._corner_init(params["params"])
        tokens = jnp.zeros((1, self.cfg.max_length), jnp.int32)
        return self.module.init(rng, tokens, jnp.ones_like(tokens, bool))["params"]

    def _corner_init(self, params):
        """`cond.corner_init='fourier'`: the corner tokens' rows of the embedding table
        start as their grid points' Fourier features (layouts.TokenLayout.corner_features);
        'normal' (the reference's) leaves the table random."""
        init = self.cfg.get("corner_init", "normal")
        if init not in ("normal", "fourier"):
            raise UserError(f"cond.corner_init={init!r}; valid: 'normal', 'fourier'.")
        if init == "normal":
            return params
        boxed = params["token_emb"]["embedding"]
        table = boxed.value if hasattr(boxed, "value") else boxed
        corners = jnp.asarray(self.tokens.corner_features(table.shape[1]), table.dtype)
        table = table.at[: corners.shape[0]].set(corners)
        emb = boxed.replace_boxed(table) if hasattr(boxed, "replace_boxed") else table
        return {**params, "token_emb": {**params["token_emb"], "embedding": emb}}

    def frozen_params(self) -> dict:
        if self._frozen is None and self._load_frozen is not None:
            self._frozen = self._load_frozen()
        return {} if self._frozen is None else {"text_encoder": self._frozen["params"]}

    def drop(self, inputs: dict, rng, rate: float) -> dict:
        """Replaces each example's condition by the unconditional one with prob. `rate`."""
        if not inputs or rate <= 0:
            return inputs
        b = next(iter(inputs.values())).shape[0]
        keep = jax.random.uniform(rng, (b,)) >= rate  # [B]
        null = self.null_inputs(1)
        out = {}
        for k, v in inputs.items():
            n = jnp.broadcast_to(jnp.asarray(null[k])[0], v.shape)
            out[k] = jnp.where(keep.reshape((-1,) + (1,) * (v.ndim - 1)), v, n)
        return out

    def embed(self, params, frozen, inputs: dict):
        """-> (context [B, L, D] or None, y [B] or None) for the UNet."""
        if self.kind == "none":
            return None, None
        if self.kind == "class":
            if self.key == "adm":
                return None, inputs["label"]
            return self.module.apply({"params": params}, inputs["label"]), None
        if self.kind == "layout":
            # Attends over the padding too, as the reference does; so the empty layout
            # (all padding) is a well-defined unconditional input.
            return self.module.apply({"params": params}, inputs["tokens"]), None
        tokens, mask = inputs["tokens"], inputs["token_mask"]
        if self.kind == "text":
            # cond.attend_padding: every token attends over the padding too, as the
            # reference's BERTEmbedder does (its released weights expect it).
            mask = None if self.cfg.get("attend_padding", False) else mask
            return self.module.apply({"params": params}, tokens, mask), None
        if self.kind == "clip":  # causal over the padding too, as Stable Diffusion's
            hidden = self.module.apply({"params": frozen["text_encoder"]}, tokens)
        else:
            hidden = self.module.apply({"params": frozen["text_encoder"]}, tokens, mask)
        return jax.lax.stop_gradient(hidden), None


def _load_clip(cond_cfg):
    """(CLIPTextEncoder, a reader of {"params": host arrays}, tokenizer) from `cond.clip`,
    `cond.tokenizer` ('sd1' / 'sd2' padding) or `cond.tokenizer_dir` (an imported
    folder's own tokenizer) and `cond.weights`."""
    from ldm_jax.interop import tensor_files
    from ldm_jax.models import clip, clip_tokenizer

    if cond_cfg.get("clip") is None or not cond_cfg.get("weights"):
        raise UserError(
            "config.cond.kind='clip' needs config.cond.clip (the text encoder's fields) and "
            "config.cond.weights (its params as .safetensors in ldm_jax naming); "
            "`python -m ldm_jax.import_sd` writes both for a Stable Diffusion checkpoint."
        )
    module = clip.CLIPTextEncoder(**dict(cond_cfg.clip))
    weights = tensor_files.existing_file(cond_cfg.weights)  # missing: one line now
    if cond_cfg.get("tokenizer_dir"):
        from ldm_jax.interop import stable_diffusion

        tokenizer = stable_diffusion.load_tokenizer_folder(cond_cfg.tokenizer_dir)
    else:
        tokenizer = clip_tokenizer.clip_tokenizer(cond_cfg.get("tokenizer", "sd1"))
    return module, lambda: {"params": tensor_files.load_params(weights)}, tokenizer
