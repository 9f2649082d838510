"""Logical axis names of the models' parameters and activations, defined once.

Each tuple names one array's dimensions (None: a dimension never sharded). Parameter
initialisers are wrapped in `nn.with_logical_partitioning` with these tuples;
`ldm_jax.parallel.mesh.LOGICAL_AXIS_RULES` maps the names onto mesh axes.
"""

CONV_KERNEL_AXES = (None, None, "conv_in", "conv_out")  # HWIO
CONV1D_KERNEL_AXES = (None, "conv_in", "conv_out")  # WIO
CONV_BIAS_AXES = ("conv_out",)
NORM_AXES = ("norm",)  # norm scales and offsets
EMBED_AXES = ("vocab", "embed")  # "vocab" has no sharding rule yet, so it is replicated
QKV_KERNEL_AXES = ("embed", "heads")
OUT_KERNEL_AXES = ("heads", "embed")
MLP_IN_AXES = ("embed", "mlp")
MLP_OUT_AXES = ("mlp", "embed")
FEATURE_MAP_AXES = ("batch", None, None, "conv_out")  # NHWC activations
