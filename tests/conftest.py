"""Test-wide settings.

Property tests draw the same examples on every run (``derandomize``), so a run's result
depends on the code alone; ``pytest --hypothesis-profile=explore`` draws new ones, to
look for counterexamples the fixed draws miss.
"""

from hypothesis import settings

settings.register_profile("deterministic", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("deterministic")
