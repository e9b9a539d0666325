"""Name rules for KubeRay objects and the stable Ray Train run name.

KubeRay (v1.7.0, validation.go) refuses a RayJob name longer than 47 characters and
a RayCronJob name longer than 36 (both DNS-1035 labels): the operator appends
suffixes (``-<5 random>`` for the job id / cluster, ``-<unixMinutes>`` for the
RayCronJob's children). The renderer checks these before anything reaches a cluster.
"""

from __future__ import annotations

import re
import time

from kd.errors import InputError

RAYJOB_MAX = 47
RAYCRONJOB_MAX = 36
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LIMITS = {"RayJob": RAYJOB_MAX, "RayCronJob": RAYCRONJOB_MAX}


def check_name(name: str, kind: str, field: str = "metadata.name") -> str:
    """Return ``name`` if it is a valid ``kind`` name, else raise `InputError` naming
    the field, the limit and what is wrong."""
    limit = LIMITS.get(kind, 63)
    if len(name) > limit:
        raise InputError(f"{field}: {kind} name {name!r} has {len(name)} characters; "
                         f"KubeRay allows at most {limit}")
    if not DNS1035.match(name):
        raise InputError(f"{field}: {kind} name {name!r} is not a DNS-1035 label (lower-case "
                         "letters, digits and '-', starting with a letter, not ending with '-')")
    return name


def slug(text: str, max_len: int) -> str:
    """``text`` as a DNS-1035 fragment: lower-case, other characters -> '-', at most
    ``max_len`` characters, starting with a letter (``kd-`` is put in front otherwise)."""
    s = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    s = re.sub(r"-{2,}", "-", s)
    if not s or not s[0].isalpha():
        s = f"kd-{s}".rstrip("-")
    return s[:max_len].rstrip("-")


def default_job_name(experiment: str, workflow: str, now: float | None = None) -> str:
    """``<experiment>-<workflow>-<yymmddHHMMSS>`` (UTC), cut to fit a RayJob name: one
    per submission, so a new `kd submit` never collides with (or resumes) an old run.
    Pass ``--name`` to resubmit under a name that already ran and resume it."""
    stamp = time.strftime("%y%m%d%H%M%S", time.gmtime(now))
    head = slug(experiment, RAYJOB_MAX - len(workflow) - len(stamp) - 2)
    return check_name(f"{head}-{workflow}-{stamp}", "RayJob")
