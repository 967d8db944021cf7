"""``imprag bench <name>``: benchmark commands that print (and optionally write) JSON.

Each module named in :data:`BENCHES` defines ``add_parser(subparsers)``, which adds its
``imprag bench <name>`` subcommand with ``set_defaults(func=...)``. Speed and memory
targets are measured here, never by timed assertions in tests.
"""

BENCHES = ("encode", "train", "serve", "engines")
