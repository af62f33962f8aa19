"""Foundation-model baseline registry (training-free trials of kind ``baseline``).

Baselines are trials like any other: the same TrialSpec, the same record, the same
memory cap and meters. Registered entries: none yet; grids that name a baseline fail
validation with the list of registered ones.
"""

from __future__ import annotations

import logging

from workers.registry import Registry

log = logging.getLogger(__name__)

BASELINES = Registry("baseline")
