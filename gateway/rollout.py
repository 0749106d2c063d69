"""Rollout state changes: pure functions from one ``Rollout`` to the next.

``genmesh rollout`` applies them to a running mesh: the new state is rendered, checked,
validated by Envoy and swapped in as xDS files (``gateway/xds.py``). Only routes change,
so connections and streams in flight are untouched; new calls follow the new weights.
"""

from __future__ import annotations

import dataclasses

from genmesh.core.deployment import DeploymentError, Rollout


def canary(r: Rollout, percent: float) -> Rollout:
    """Send ``percent`` of worker traffic to the candidate."""
    _need_candidate(r, "canary")
    return dataclasses.replace(r, canary_percent=float(percent))


def shadow(r: Rollout, percent: float) -> Rollout:
    """Mirror ``percent`` of Generate calls to the candidate (callers never see it)."""
    _need_candidate(r, "shadow")
    return dataclasses.replace(r, shadow_percent=float(percent))


def promote(r: Rollout) -> Rollout:
    """The candidate takes all traffic; the old primary stays deployed as the candidate at
    0 %, and is what ``rollback`` returns to."""
    candidate = _need_candidate(r, "promote")
    return Rollout(primary=candidate, candidate=r.primary, split=r.split,
                   previous_primary=r.primary)


def rollback(r: Rollout) -> Rollout:
    """Undo: after a promote, back to the previous primary; otherwise stop the canary and
    the shadow, so the primary takes all traffic."""
    if r.previous_primary is not None:
        return Rollout(primary=r.previous_primary, candidate=r.primary, split=r.split)
    return dataclasses.replace(r, canary_percent=0.0, shadow_percent=0.0)


def describe(r: Rollout) -> str:
    parts = [f"primary {r.primary}"]
    if r.candidate is not None:
        parts.append(f"candidate {r.candidate}: canary {r.canary_percent:g}% "
                     f"(split by {r.split}), shadow {r.shadow_percent:g}%")
    if r.previous_primary is not None:
        parts.append(f"rollback returns to {r.previous_primary}")
    return "; ".join(parts)


def _need_candidate(r: Rollout, action: str) -> str:
    if r.candidate is None:
        raise DeploymentError(f"cannot {action}: the rollout has no candidate version "
                              "(add a second version to the deployment)")
    return r.candidate
