"""Parallelism: the device mesh, logical axis names and their rules, shardings of
parameters, optimizer state and batches, pmap data parallelism, multi-process start-up.

    mesh.py          make_mesh(config.mesh): named axes (data, fsdp, tensor)
    logical.py       logical axis names of every parameter (from its path) and of the
                     batch; DEFAULT_RULES (logical name -> mesh axes)
    sharding.py      logical names -> PartitionSpec / NamedSharding (with the
                     divisibility fallback), placing host values and process-local
                     batches as global arrays
    activations.py   constrain(x, logical names): activation sharding constraints by the
                     same rules, active inside activation_sharding(mesh, rules) only
    data_parallel.py jax.pmap helpers: replicated state, batches split over local devices
    distributed.py   jax.distributed.initialize from flags, the environment or SLURM

Nothing here knows about models or training: train/ uses it (train -> parallel), and
models/ marks its activations with activations.constrain (models -> parallel).
"""
