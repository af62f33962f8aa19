"""Control plane of vramsweep: grid spec, expansion, Ray Tune driver, records, analysis.

Nothing in this package imports torch at module import time: the driver process
validates and schedules, the workers (``workers/``) train. The one exception,
``warm_import``, is what a local Ray's worker processes import as they start.
"""
