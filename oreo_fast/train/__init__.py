"""OREO and RFT training: ``python -m oreo_fast.train`` / ``torchrun -m oreo_fast.train``.

- ``trainer``: the loop (``Trainer``, ``main``);
- ``step``: one micro-step per algorithm (``OreoStep``, ``RftStep``);
- ``parallelize``: FSDP2 roots, sharding, mixed precision, attention and Liger choices;
- ``checkpoint``: sharded (DCP) save and resume (``Checkpointer``); ``export``: the
  gathered ``policy/`` + ``value/`` Hugging Face pair;
- ``distributed``: device and process group; ``guard``: the non-finite guard and fault hooks;
- ``data``: trajectories to ids, masks and batches; ``schedule``: the learning-rate schedule;
- ``metrics``: metrics JSONL, TensorBoard / W&B, curves; ``config``: ``TrainConfig``.
"""
