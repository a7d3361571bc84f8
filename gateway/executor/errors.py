"""The executor's one error: it can run no more steps (a tensor-parallel peer died or timed
out in a collective, or a worker's driver is gone). Raised here, at the lowest layer that
knows; the engine loop turns it into its own EngineDeadError for every request."""


class ExecutorDeadError(RuntimeError):
    """This executor is gone for good: workers are not restarted."""


class RendezvousError(RuntimeError):
    """The ranks of a pipeline-parallel or multi-host run did not all meet at start-up (a rank
    missing after --dist-timeout, one that failed, a leader that cannot be reached)."""
