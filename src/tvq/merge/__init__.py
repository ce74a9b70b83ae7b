"""Model merging straight from task vectors: FP32 checkpoints, TVQ/RTVQ/FQ packs, or a mix.

    from tvq.merge import load_task_vectors, merge
    pre, tvs = load_task_vectors("base/", packs=["pack/"], finetuned={"extra": "ft.safetensors"})
    merge("ties", pre, tvs, "merged/", {"density": 0.2, "lambda": 0.3})
    merge("ties", pre, tvs, "merged/", executor=tvq.execute.make_executor("ray"))  # same bytes

Methods stream tensor by tensor; see ``available_methods()`` and docs/merging.md.
"""

from __future__ import annotations

import tvq.merge.methods  # noqa: F401  (registers every built-in method with tvq.merge.registry)
from tvq.merge.adamerging import AdaMergingResult, adamerging, entropy_loss
from tvq.merge.engine import MergeJob, MergeReport, emr_task_model, merge, merge_key, merge_state_dict, write_model
from tvq.merge.methods.emr import EMRPack, open_emr
from tvq.merge.registry import MergeMethod, MethodOptions, available_methods, build_method, merge_method, method_class
from tvq.merge.source import MergeInputs, Origin, TaskInput, TaskInputs, TaskSource, load_task_vectors
from tvq.merge.statistics import NormStatsWarning
from tvq.normstats import reestimate_norm_stats, statistic_keys

__all__ = [
    "AdaMergingResult",
    "EMRPack",
    "MergeInputs",
    "MergeJob",
    "MergeMethod",
    "MergeReport",
    "MethodOptions",
    "NormStatsWarning",
    "Origin",
    "TaskInput",
    "TaskInputs",
    "TaskSource",
    "adamerging",
    "available_methods",
    "build_method",
    "emr_task_model",
    "entropy_loss",
    "load_task_vectors",
    "merge",
    "merge_key",
    "merge_method",
    "merge_state_dict",
    "method_class",
    "open_emr",
    "reestimate_norm_stats",
    "statistic_keys",
    "write_model",
]
