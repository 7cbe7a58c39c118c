"""What assembles the services into programs: the offline ``LLM``, ``pagoda serve`` and
the ``pagoda`` command. The only part of pagoda that imports the service packages;
nothing below it imports it back (an import-linter layers contract)."""
