"""`kd serve`: a Ray Serve application that serves ``models:/NAME@ALIAS`` over HTTP and
follows the alias (docs/serving.md#kd-serve).

- `model`    one loaded version (verified registry read, never unpickled), request parsing
             and the answer rows; no Ray Serve imports.
- `watch`    resolving the alias (poll + webhook trigger) and applying a new version to
             the running application through Serve's ``user_config``.
- `webhook`  MLflow registry webhook payloads and their HMAC signature.
- `app`      the deployments (Model: batched, swapped by ``reconfigure``; Ingress: routes
             and the watcher) and `build(args)`, the Serve app builder.
- `run`      what `kd serve NAME` does: start / join Ray and Serve, deploy, block.

Layering: beside retrain/ and deploy/; imports registry/, tracking, errors, runtime.
Nothing below imports kd.serve.
"""
