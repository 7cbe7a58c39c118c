"""pagoda: LLM serving split into a gateway, a scheduler and workers that scale on their own.

Importing this package never imports torch: services import its submodules
(``pagoda.v1``, ``pagoda.sampling_params``); the offline engine is loaded lazily.
"""

__version__ = "0.1.0"
