"""Compatibility: models registered before kdflow 0.1.0's loader rename name
``loader_module: kd.serving`` and ship their own ``code/kd/``.

In a fresh interpreter MLflow imports that shipped copy. When kdflow is already imported,
``kd`` is the installed package and ``kd.serving`` resolves here: the same loader,
`kd.registry.loader`, rebuilds the model with the installed families. New models use
``loader_module: kdflow_model_loader`` and need no shim. Keep this module while models
registered by older versions are served.
"""

from kd.registry.loader import (  # noqa: F401
    CONFIG,
    DATA_DIR,
    WEIGHTS,
    ChecksumError,
    StudentModel,
    _load_pyfunc,
    build_module,
    read_safetensors,
    sha256_file,
    to_batch,
)
