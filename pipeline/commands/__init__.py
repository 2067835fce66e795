"""The commands of ``python -m pipeline``, one module each, beside ``__main__``.

Each module has ``add_arguments(parser)`` and ``run(args) -> int`` and only turns arguments into calls:
the work it asks for lives in the library packages (data, flows, theory, train, track, study), which
import nothing from here.
"""
