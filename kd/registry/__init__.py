"""The MLflow model registry: register, gate + promote + rollback, verified reads (store),
the loader shipped with every model, predict, the model card. Not to be confused with
`kd.plugins` (the name -> factory table). See docs/registry.md."""
