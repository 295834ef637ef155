"""Programs and a library that talk to the OPD token service: the display board and a typed client."""
