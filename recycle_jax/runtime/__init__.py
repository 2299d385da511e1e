"""Runtime services every layer uses: one-line errors (`errors`), validation of flags,
bindings and files (`validation`), outputs written whole or not at all (`outputs`), locks
(`locking`), signals (`interrupts`), bounded waits (`waits`), quiet native logs (`quiet`),
multi-host barriers (`multihost`), and the one plugin `registry`.

Imports: nothing else of recycle_jax (the lowest layer)."""
