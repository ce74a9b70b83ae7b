"""Per-tensor encoders, one per method, and the pipeline that turns checkpoints into a pack.

The flow: options -> job (one tensor) -> key (read, check, pick the method) -> tvq / rtvq / fq
(over chunk sources, through tvq.quant) -> pipeline (executors, pack files, manifest);
incremental adds tasks to a pack or re-bases it; budget allocates bits per tensor.
"""
