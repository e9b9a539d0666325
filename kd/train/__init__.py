"""One run end to end: assembly, the worker loop and its parts, the driver, the teacher cache,
feature capture, pruning, semi-supervision, evaluation. Below tune/ and registry/; above data/,
models/, losses/ and the foundation. See docs/architecture.md."""
