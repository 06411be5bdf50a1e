"""What runs, in which order, with which retries and schedules: Prefect flows over ``tasks/``.

The command line (``protonmf ...``) lives here too, in :mod:`flows.cli`, because it starts runs.
"""
