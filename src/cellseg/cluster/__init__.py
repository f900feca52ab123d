"""Stage 7's machinery, the cluster side: job manifests (:mod:`.jobs`), the launcher that runs
and watches them (:mod:`.launch`, :mod:`.pods`, :mod:`.logs`), the API calls it makes
(:mod:`.api_calls`) and ``cellseg doctor``, which checks exactly those. ``cellseg.steps`` calls
it; it imports nothing from ``steps`` or ``cli``."""
