"""pagoda's wire contracts: Python generated from proto/pagoda/v1 by scripts/gen_proto.py.

Import the generated modules by name (``from pagoda.v1 import step_pb2``). Nothing
here imports torch; every service may depend on it.
"""

# Version of the step protocol (Hello) and of the gateway session (OpenSession).
# Bump it on any change that an older peer would misread.
PROTOCOL_VERSION = 1
