"""Ray Jobs and KubeRay submission: RayJob / RayCronJob rendering (`render`), the
name rules KubeRay enforces (`names`), and `kd submit` (`submit`, `k8s`).

Layering: imports only kd.config, kd.errors, kd.storage, kd.runtime; nothing below
imports kd.deploy.
"""
