"""The workflow catalog every process reads: types (`specs`), catalog files (`files`),
parameter checks (`params`) and DAG unrolling (`unroll`), all pure.

The broker owns the live registry built from it; actors, the scheduler and clients
read it to load models, price work and list workflows.
"""

from broker.catalog.files import load_catalog, parse_catalog
from broker.catalog.params import (
    check_adapters,
    check_image,
    check_value,
    img2img_runs,
    task_adapters,
    validate_params,
)
from broker.catalog.specs import (
    ADAPTED_KINDS,
    ADAPTER_WEIGHT,
    CONTROL_PREPROCESSORS,
    INPUT_TYPES,
    MAX_ADAPTERS,
    MODEL_KINDS,
    OUTPUTS,
    PIPELINE_PREFIX,
    SAMPLERS,
    AdapterSpec,
    Catalog,
    CatalogError,
    InputSpec,
    ModelSpec,
    NodePlan,
    ParamError,
    PipelineSpec,
    WorkflowSpec,
    control_suffixes,
    pipeline_name,
)
from broker.catalog.unroll import LATENT_CONTROL_FAMILIES, unroll, unroll_monolith
from broker.protocol.constants import MAX_SEED

__all__ = [
    "check_value",
    "ADAPTED_KINDS",
    "ADAPTER_WEIGHT",
    "AdapterSpec",
    "CONTROL_PREPROCESSORS",
    "Catalog",
    "CatalogError",
    "INPUT_TYPES",
    "InputSpec",
    "LATENT_CONTROL_FAMILIES",
    "MAX_ADAPTERS",
    "MAX_SEED",
    "MODEL_KINDS",
    "ModelSpec",
    "NodePlan",
    "OUTPUTS",
    "PIPELINE_PREFIX",
    "ParamError",
    "PipelineSpec",
    "SAMPLERS",
    "WorkflowSpec",
    "check_adapters",
    "check_image",
    "control_suffixes",
    "img2img_runs",
    "load_catalog",
    "parse_catalog",
    "pipeline_name",
    "task_adapters",
    "unroll",
    "unroll_monolith",
    "validate_params",
]
