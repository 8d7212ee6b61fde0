"""`hf-distill run`: checked config -> teacher -> student -> distill -> refine -> export -> bench -> report -> push.

``config`` checks every value before anything runs, ``workspace`` is the only place that knows the run folder's
layout, ``stages`` is the ordered stage table, ``run`` the runner, ``report`` and ``hub`` what a run publishes.
"""

from hf_distill.pipeline.config import PipelineConfig, load_pipeline_config
from hf_distill.pipeline.run import Pipeline

__all__ = ["Pipeline", "PipelineConfig", "load_pipeline_config"]
