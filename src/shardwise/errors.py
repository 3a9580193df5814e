"""Exceptions: mistakes a user can fix, and a stage lost under the engine."""


class ShardwiseError(Exception):
    """A user-caused problem. The message names the problem and how to fix it;
    the CLI prints it as one line, without a traceback."""


class StepError(Exception):
    """A pipeline stage raised while running a step, and lives: the step failed, not the stage."""


class StageFailure(Exception):
    """A pipeline stage died or stopped answering: not the user's doing, and recoverable by
    replacing the stage (Pipeline.recover) and replaying the running sequences. step: the
    executor's handle of the step that failed (hung: that did not finish in time)."""

    def __init__(self, message: str, step: object = None, hung: bool = False):
        super().__init__(message)
        self.step, self.hung = step, hung


class Drifted(StageFailure):
    """Every stage lives, but the pipeline moves to a new plan (`plan`): a node's speed drifted
    from its profile and the plan pays, or an operator gave it. The scheduler moves the
    sequences' KV with the layers (Pipeline.migrate), or else replays them as after a lost stage."""

    def __init__(self, message: str, plan: object):
        super().__init__(message)
        self.plan = plan
