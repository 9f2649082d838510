"""XLA flags of every test process (pytest's own and the commands it starts): the test
suite's time is mostly XLA:CPU compiling toy models, whose run time does not matter, and
level 0 halves that compile time.

Tried and left out: `--xla_cpu_use_fusion_emitters=false` compiles the tiny autoencoder's
step in 6.3 s instead of 8.8-9.8 s, but its GAN step then differs between 4 processes and
one device by 1.8e-4 (relative), beyond the multi-process test's 1e-5.

Kept in this import-free module: conftest sets them before jax is imported.
"""

FAST_COMPILE = "--xla_backend_optimization_level=0"
