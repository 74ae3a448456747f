"""The errors the training library raises (each message says what is wrong and what is allowed)."""


class TrainError(RuntimeError):
    """Training cannot start or finish; the message says why."""


class ResumeError(TrainError):
    """The checkpoint directory holds a state this run cannot resume from."""


class TrainingInterrupted(RuntimeError):
    """Raised by the `stop_after_epoch` hook after that epoch's checkpoint is written (simulates a crash)."""
