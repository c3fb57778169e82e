"""Deployment postures: what a deployed keyed model answers, and how it resists attackers who query it.

:mod:`.spec` parses and records a posture; :mod:`.graph` builds its in-graph part (noise before the shuffle,
top-k or label outputs) around a deployable module; :mod:`.guard` is the device-side part (query guard, rate
limit), which the device runtime applies around any runner.
"""

from keyedge.postures.spec import (
    GUARD_ACTIONS,
    OUTPUTS,
    RECOMMENDED,
    SCORES,
    Posture,
    PostureError,
    parse_posture,
)

__all__ = ["GUARD_ACTIONS", "OUTPUTS", "RECOMMENDED", "SCORES", "Posture", "PostureError", "parse_posture"]
