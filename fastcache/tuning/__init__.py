"""The tuning wing (``fastcache tune``): ``sweep`` measures candidates, ``fidelity`` scores images against the uncached
ones, ``report`` picks and reports, ``command`` is the command line. The runtime (``fastcache/*.py``) imports nothing
from here."""
