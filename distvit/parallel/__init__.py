"""Everything about ranks: launch discovery and the dp x sp mesh (mesh.py), collectives on the
right device (comm.py), the generated DeepSpeed config (deepspeed_config.py) and engine
(engine.py), sequence-parallel attention (sequence_parallel.py: Ulysses, ring; hybrid.py) and
decode across sp ranks (decode_sp.py), the token-sharding wiring of the models with its gradient
hooks, shared dropout masks and DeepSpeed mpu (parallelize*.py), and ZeRO-3 x sp (zero3_sp.py).

Models stay pure (distvit.models: no torch.distributed); this package acts on them from outside,
as torchtitan's parallelize step does. Besides distvit.offload and distvit.checkpoint, it is the
only place that imports deepspeed.
"""
