"""Where work runs: Ray tasks and actors, each a thin wrapper that loads inputs, calls
:mod:`protonmf`, and saves outputs."""
